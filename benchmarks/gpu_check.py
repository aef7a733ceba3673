"""The prepared GPU check: what only a GPU exercises, run once on a lent one in an 8-minute budget (not yet run on a
GPU), with one summary table and the records under ``--out`` (default: $OUT, else benchmarks/results). Start it with
gpu_check.sh, which installs the wheels a bare GPU machine lacks:

    bash benchmarks/gpu_check.sh --prepare                # here, where PyPI answers: wheels and data → .gpu_check/
    bash benchmarks/gpu_check.sh                          # on the GPU machine, with .gpu_check carried along
    bash benchmarks/gpu_check.sh --dry-run --device cpu   # every step on the CPU with tiny counts (a test runs it)

Each step runs in processes of its own under a time limit; a failed step is recorded and the next one runs, and a step
that no longer fits in ``--budget-s`` is skipped and said so. Correctness first, speed last:

    environment         torch, the device, bf16, the packages the wheels bring
    phase 1             train_progressive.py on the real DEIMv2-Atto (configs/coco_tiny.yaml): bf16 autocast (the CUDA
                        default), fused AdamW, EMA, evaluation, checkpoints
    phase 2 killed      SIGKILL once its first mid-epoch checkpoint exists
    phase 2 resumed     --resume continues it to its last step
    eval-only           the phase-2 weights evaluated on the device and on the CPU: AP equal within 1e-3
    predict → evaluate  predict's detections.json scored by deim_lib.evaluate: the same AP within 1e-3
    export              ONNX export of the phase-2 checkpoint
    torchrun            train_progressive.py under torchrun --nproc_per_node=1 (a world of one: no process group)
    ddp                 benchmarks/ddp_check.py: DDP steps, SyncBatchNorm and the collectives over NCCL
    throughput          benchmarks/throughput.py: s and m at bs 16, 640 px (s with the sync profile), s compiled
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Run as ``python benchmarks/gpu_check.py``: the project packages (read for the checkpoints' state) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal.train.checkpoint import read_phase_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".gpu_check"  # what gpu_check.sh --prepare writes: wheels/ and shared/
AP_TOLERANCE = 1e-3
BATCH_SIZE = 8  # configs/coco_tiny.yaml's
SHARED_FILES = (
    "real/deimv2_atto_coco.pth",
    "clip/coco_clip_a+cname.npy",
    "datasets/coco-tiny/train2017",
    "datasets/coco-tiny/val2017",
    "datasets/coco-tiny/annotations/instances_train2017.json",
    "datasets/coco-tiny/annotations/instances_val2017.json",
)


@dataclass(frozen=True)
class Counts:
    """How much each step does: the real run's, or --dry-run's tiny ones."""

    train_images: int | None  # None: all 80 of coco-tiny train
    val_images: int | None
    phase1_epochs: int
    phase2_epochs: int
    checkpoint_every_steps: int  # phase 2's first checkpoint, where it is killed
    ddp: tuple[str, ...]  # arguments of benchmarks/ddp_check.py
    throughput: dict[str, tuple[str, ...]]  # record name → arguments of benchmarks/throughput.py
    throughput_steps: tuple[str, ...]


FULL = Counts(
    train_images=None,
    val_images=None,
    phase1_epochs=3,  # 30 steps
    phase2_epochs=2,  # 20 steps, killed after 5
    checkpoint_every_steps=5,
    ddp=(),
    throughput={
        "s_16_640": ("--variant", "s", "--batch-size", "16", "--image-size", "640", "--profile", "--ema"),
        "m_16_640": ("--variant", "m", "--batch-size", "16", "--image-size", "640", "--breakdown", "none"),
        "s_16_640_compile": (
            *("--variant", "s", "--batch-size", "16", "--image-size", "640"),
            *("--cases", "phase1", "eval", "--breakdown", "none", "--compile"),
        ),
    },
    throughput_steps=("--steps", "10", "--warmup", "3"),
)
DRY_RUN = Counts(
    train_images=16,  # 2 steps an epoch
    val_images=8,
    phase1_epochs=1,
    phase2_epochs=2,
    checkpoint_every_steps=1,
    ddp=("--image-size", "160", "--batch-size", "2"),
    # torch.compile takes a minute on a shared CPU: tests/multimodal/train/test_compile.py runs it, and
    # tests/test_gpu_check.py parses the real run's arguments.
    throughput={
        "atto_2_160": (
            *("--variant", "atto", "--batch-size", "2", "--image-size", "160"),
            *("--cases", "phase1", "eval", "--profile", "--ema"),
        ),
    },
    throughput_steps=("--steps", "1", "--warmup", "0"),
)


class StepError(Exception):
    """A step's command failed or its result is wrong; the message is the table's cell."""


@dataclass
class Run:
    """One check: its arguments, folders, the log every command's output goes to and what the steps found."""

    args: argparse.Namespace
    counts: Counts
    work: Path  # checkpoints, ONNX, predictions: not brought back
    data: dict[str, Path]  # train_images, train_annotations, val_images, val_annotations
    log_path: Path
    deadline: float
    records: dict = field(default_factory=dict)  # per step, what the JSON record keeps

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def command(self, *arguments: str, limit_s: float) -> str:
        """Run ``python ARGUMENTS`` in the repository root; its output (stdout and stderr) is returned and logged."""
        command = [sys.executable, *arguments]
        started = time.perf_counter()
        try:
            finished = subprocess.run(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit_s
            )
            output, code = finished.stdout, finished.returncode
        except subprocess.TimeoutExpired as error:
            output, code = error.stdout or "", None
        self.log(command, output, time.perf_counter() - started)
        if code is None:
            raise StepError(f"over its {limit_s:.0f} s limit: {' '.join(arguments[:3])} …")
        if code != 0:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
            raise StepError(f"exit {code}: {last[0][:200]}")
        return output

    def log(self, command: list[str], output: str, seconds: float) -> None:
        with self.log_path.open("a") as log:
            log.write(f"\n$ {' '.join(command)}   # {seconds:.1f} s\n{output}")

    def train(self, *arguments: str, output_dir: Path | None = None) -> list[str]:
        """train_progressive.py's arguments for coco-tiny with the real atto, these counts and this device; the output
        directory is the run's own unless given."""
        shared = self.args.shared
        settings = {
            "model.weights": shared / "real/deimv2_atto_coco.pth",
            "text_encoder.precomputed": shared / "clip/coco_clip_a+cname.npy",
            **{f"data.{key}": path for key, path in self.data.items()},
            "phase1.epochs": self.counts.phase1_epochs,
            "phase2.epochs": self.counts.phase2_epochs,
            "phase2.checkpoint_every_steps": self.counts.checkpoint_every_steps,
        }
        sets = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
        output_dir = output_dir or self.run_dir
        common = ["--config", "configs/coco_tiny.yaml", "--output-dir", str(output_dir), "--device", self.device]
        return ["train_progressive.py", *common, *sets, *arguments]

    def steps_per_epoch(self) -> int:
        return (self.counts.train_images or 80) // BATCH_SIZE


def environment(run: Run, limit_s: float) -> str:
    script = (
        "import json, torch, open_clip, faster_coco_eval, pycocotools, ftfy\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'torch': torch.__version__, 'device': torch.cuda.get_device_name() if cuda else 'cpu',"
        " 'bf16': torch.cuda.is_bf16_supported() if cuda else None, 'open_clip': open_clip.__version__,"
        " 'faster_coco_eval': faster_coco_eval.__version__, 'ftfy': ftfy.__version__}))"
    )
    found = json.loads(run.command("-c", script, limit_s=limit_s).splitlines()[-1])
    run.records["environment"] = found
    if run.device == "cuda" and found["device"] == "cpu":
        raise StepError("--device cuda, but torch sees no GPU")
    return ", ".join(f"{key} {value}" for key, value in found.items())


def phase1(run: Run, limit_s: float) -> str:
    run.command(*run.train("--phase", "1"), limit_s=limit_s)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    base = json.loads((run.run_dir / "baseline.json").read_text())["AP"]
    last = records[-1]
    run.records["phase1"] = [{key: record[key] for key in ("epoch", "AP", "AP50", "train")} for record in records]
    steps, speed = last["train"]["step"], last["train"]["images_per_s"]
    return f"{steps} steps, {speed:.1f} img/s; AP {base:.4f} (base) → {last['AP']:.4f}"


def phase2_killed(run: Run, limit_s: float) -> str:
    """Phase 2, killed (SIGKILL, as a lost machine would end it) once its first step checkpoint is written."""
    last = run.run_dir / "phase2_last.pth"
    command = [sys.executable, *run.train("--phase", "2")]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None and not last.exists() and time.perf_counter() - started < limit_s:
            time.sleep(0.1)
        process.kill()
        code = process.wait()
        output.seek(0)
        run.log(command, output.read(), time.perf_counter() - started)
    if code != -signal.SIGKILL or not last.exists():
        raise StepError(f"not killed after its first checkpoint (exit {code}, {last.name} written: {last.exists()})")
    step = checkpoint_state(last)[0]
    run.records["phase2_killed_at_step"] = step
    return f"killed at step {step} of {run.counts.phase2_epochs * run.steps_per_epoch()}"


def phase2_resumed(run: Run, limit_s: float) -> str:
    last = run.run_dir / "phase2_last.pth"
    started_at = checkpoint_state(last)[0]
    run.command(*run.train("--phase", "2", "--resume", str(last)), limit_s=limit_s)
    step, finished = checkpoint_state(last)
    expected = run.counts.phase2_epochs * run.steps_per_epoch()
    if not finished or step != expected:
        raise StepError(f"resumed at step {started_at}, ended at step {step} of {expected} (finished: {finished})")
    return f"resumed at step {started_at}, finished at step {step}"


def checkpoint_state(path: Path) -> tuple[int, bool]:
    """(optimiser steps taken, phase finished) of a phase checkpoint."""
    checkpoint = read_phase_checkpoint(path)
    return checkpoint.progress.state.step, checkpoint.finished


def eval_only(run: Run, limit_s: float) -> str:
    """--eval-only of the phase-2 weights (where phase 3 would start) on the device and on the CPU."""
    aps = {}
    for device in dict.fromkeys([run.device, "cpu"]):
        arguments = [*run.train("--phase", "3", "--eval-only"), "--device", device]
        output = run.command(*arguments, limit_s=limit_s / 2)
        lines = [line for line in output.splitlines() if line.startswith("metrics: ")]
        if not lines:
            raise StepError(f"--eval-only on {device} printed no 'metrics: ' line")
        aps[device] = json.loads(lines[-1].removeprefix("metrics: "))["AP"]
    run.records["eval_only_AP"] = aps
    difference = abs(aps[run.device] - aps["cpu"])
    result = ", ".join(f"AP {ap:.4f} on {device}" for device, ap in aps.items())
    if difference > AP_TOLERANCE:
        raise StepError(f"{result}: they differ by {difference:.4f} > {AP_TOLERANCE}")
    return result


def predict_evaluate(run: Run, limit_s: float) -> str:
    predictions = run.work / "predictions"
    checkpoint = str(run.run_dir / "phase2_best.pth")
    images, ann = str(run.data["val_images"]), str(run.data["val_annotations"])
    predict = ["-m", "multimodal.tools.predict", "--checkpoint", checkpoint, "--images", images, "--ann", ann]
    run.command(*predict, "--output", str(predictions), "--device", run.device, limit_s=limit_s * 2 / 3)
    detections = str(predictions / "detections.json")
    evaluate = ["-m", "deim_lib.evaluate", "--ann", ann, "--detections", detections, "--json"]
    output = run.command(*evaluate, limit_s=limit_s / 3)
    ap = json.loads(output.splitlines()[-1])["AP"]
    run.records["predict_evaluate_AP"] = ap
    eval_only_ap = run.records.get("eval_only_AP", {}).get(run.device)
    if eval_only_ap is None:
        raise StepError(f"AP {ap:.4f}; no --eval-only AP to compare with")
    if abs(ap - eval_only_ap) > AP_TOLERANCE:
        raise StepError(f"AP {ap:.4f} against --eval-only's {eval_only_ap:.4f}")
    return f"AP {ap:.4f} (--eval-only: {eval_only_ap:.4f})"


def export(run: Run, limit_s: float) -> str:
    model = run.work / "model.onnx"
    checkpoint = str(run.run_dir / "phase2_best.pth")
    run.command("-m", "multimodal.tools.export", "--checkpoint", checkpoint, "--output", str(model), limit_s=limit_s)
    return f"{model.name}: {model.stat().st_size / 2**20:.1f} MiB"


def torchrun(run: Run, limit_s: float) -> str:
    train = run.train("--phase", "1", "--set", "phase1.epochs=1", output_dir=run.work / "torchrun")
    run.command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *train, limit_s=limit_s)
    return f"phase 1 for one epoch ({run.steps_per_epoch()} steps)"


def ddp(run: Run, limit_s: float) -> str:
    record_path = run.work / "ddp.json"
    processes = 1 if run.device == "cuda" else 2  # NCCL takes one process per GPU; gloo shows a real world of 2
    script = ["benchmarks/ddp_check.py", "--device", run.device, "--json", str(record_path), *run.counts.ddp]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    run.command(*launch, *script, limit_s=limit_s)
    record = json.loads(record_path.read_text())
    run.records["ddp"] = record
    if run.device == "cuda" and not (record["phase0"]["bf16"] and record["phase1"]["bf16"]):
        raise StepError("the training step did not run under bf16 autocast on CUDA, its default")
    phases = "; ".join(
        f"{name}: losses {', '.join(f'{loss:.2f}' for loss in values['losses'])}, "
        f"{values['sync_batchnorm_layers']} SyncBatchNorm, bf16 {values['bf16']}"
        for name, values in record.items()
        if name.startswith("phase")
    )
    return f"{record['backend']}, {record['world_size']} process(es): {phases}"


def throughput(name: str, arguments: tuple[str, ...]) -> Callable[[Run, float], str]:
    """The step that runs benchmarks/throughput.py with ``arguments`` into the record throughput_<device>_<name>."""

    def measure(run: Run, limit_s: float) -> str:
        path = run.args.out / f"throughput_{run.device}_{name}.json"
        where = ("--device", run.device, "--json", str(path))
        run.command("benchmarks/throughput.py", *arguments, *run.counts.throughput_steps, *where, limit_s=limit_s)
        results = json.loads(path.read_text())["results"]
        return ", ".join(f"{case} {result['images_per_s']:.1f} img/s" for case, result in results.items())

    return measure


def plan(counts: Counts) -> list[tuple[str, float, Callable[[Run, float], str]]]:
    """(name, time limit in s, step) in order."""
    steps = [
        ("environment", 60, environment),
        ("phase 1", 120, phase1),
        ("phase 2 killed", 90, phase2_killed),
        ("phase 2 resumed", 90, phase2_resumed),
        ("eval-only", 90, eval_only),
        ("predict → evaluate", 90, predict_evaluate),
        ("export", 60, export),
        ("torchrun", 90, torchrun),
        ("ddp", 90, ddp),
    ]
    return steps + [(f"throughput {name}", 150, throughput(name, a)) for name, a in counts.throughput.items()]


def prepare_data(counts: Counts, shared: Path, work: Path) -> dict[str, Path]:
    """coco-tiny's paths; with fewer images asked for, COCO files of the first ones (the images stay where they are)."""
    coco_tiny = shared / "datasets" / "coco-tiny"
    data = {}
    for split, count in (("train", counts.train_images), ("val", counts.val_images)):
        annotations = coco_tiny / "annotations" / f"instances_{split}2017.json"
        if count is not None:
            full = json.loads(annotations.read_text())
            kept = full["images"][:count]
            ids = {image["id"] for image in kept}
            boxes = [box for box in full["annotations"] if box["image_id"] in ids]
            annotations = work / f"{split}_{count}.json"
            annotations.write_text(json.dumps(full | {"images": kept, "annotations": boxes}))
        data[f"{split}_images"], data[f"{split}_annotations"] = coco_tiny / f"{split}2017", annotations
    return data


def summary_table(rows: list[dict]) -> str:
    lines = ["| step | status | s | result |", "|---|---|---:|---|"]
    lines += [f"| {row['step']} | {row['status']} | {row['seconds']:.0f} | {row['result']} |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny counts: every step in about two minutes on a CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    parser.add_argument(
        "--shared",
        type=Path,
        default=STAGE / "shared" if (STAGE / "shared").is_dir() else ROOT.parent / "shared",
        help="the reference material: .gpu_check/shared when prepared, else ../shared",
    )
    parser.add_argument("--budget-s", type=float, default=480, help="steps that no longer fit are skipped")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.shared = args.shared.resolve()
    missing = [name for name in SHARED_FILES if not (args.shared / name).exists()]
    if missing:
        prepare = "bash benchmarks/gpu_check.sh --prepare"
        print(f"error: {args.shared} lacks {', '.join(missing)}; give --shared, or run {prepare}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    counts = DRY_RUN if args.dry_run else FULL
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log_path = args.out / "gpu_check.log"
    log_path.write_text(f"gpu_check {'--dry-run ' if args.dry_run else ''}--device {args.device}, work in {work}\n")
    started = time.perf_counter()
    run = Run(args, counts, work, prepare_data(counts, args.shared, work), log_path, started + args.budget_s)
    rows = []
    for name, limit_s, step in plan(counts):
        step_started = time.perf_counter()
        left = run.deadline - step_started
        if left < 20:
            rows.append({"step": name, "status": "skipped", "seconds": 0, "result": "out of --budget-s"})
            continue
        try:
            status, result = "ok", step(run, min(limit_s, left))
        except StepError as error:
            status, result = "FAILED", str(error)
        except Exception as error:  # a broken record or file: the step failed, the next ones still run
            status, result = "FAILED", f"{type(error).__name__}: {error}"
        rows.append({"step": name, "status": status, "seconds": time.perf_counter() - step_started, "result": result})
        print(f"{name}: {status}, {result}", flush=True)

    table = summary_table(rows)
    total = time.perf_counter() - started
    heading = f"gpu_check on {args.device}{' (dry run)' if args.dry_run else ''}: {total:.0f} s"
    (args.out / "gpu_check.md").write_text(f"{heading}\n\n{table}\n")
    record = {"device": args.device, "dry_run": args.dry_run, "seconds": total, "steps": rows, **run.records}
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{heading}\n{table}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
