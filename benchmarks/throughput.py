"""Training and inference throughput of DEIMv2 full fine-tuning against the progressive phases, on synthetic batches.

One run measures, for one variant, batch size and resolution on one device: ``full`` (the bare detector with phase
0's recipe, everything trainable but the official constants), ``phase1``–``phase3`` (the text-fusion model with the
phase's parts trainable) and ``eval`` (eval forward + post-processing of the text-fusion model). The training cases
are set up and stepped by ``multimodal.train.step`` (``build_phase``, ``train_step``): the code train_progressive.py
runs, timed as it is.

    python benchmarks/throughput.py --variant s --batch-size 16 --image-size 640 --device cuda
    python benchmarks/throughput.py --variant s --batch-size 16 --image-size 640 --device cuda --profile --ema
    python benchmarks/throughput.py --variant atto --batch-size 4 --image-size 320 --device cpu --steps 3 --warmup 1

Prints a table and writes a JSON record (default benchmarks/results/throughput_<device>_<variant>_<bs>_<size>.json).
On a shared CPU set OMP_NUM_THREADS=1: spinning OpenMP workers that compete with other jobs make steps erratic.
"""

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.utils.hooks import RemovableHandle

# Run as ``python benchmarks/throughput.py``: the project packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deim_lib import VARIANTS, PostProcessor, build_detector, get_variant
from multimodal.config import TrainConfig
from multimodal.model.detector import MultimodalDetector, attach_text
from multimodal.train.freezing import compile_frozen_parts, constant_parameters
from multimodal.train.report import device_name
from multimodal.train.step import Phase, build_phase, train_step, uses_bf16

CASES = ("full", "phase1", "phase2", "phase3", "eval")
TRAIN_CASES = CASES[:4]
TEXT_DIM = 512  # CLIP ViT-B/32 text embedding width
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20
# Runtime calls that block the host until the GPU has drained (every .item(), .cpu() and blocking H2D copy ends in one).
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="s")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=640, help="square input side, a multiple of 32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast: --amp on any device (the CPU too), --no-amp never; default: on CUDA only, as training",
    )
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes-per-image", type=int, default=6)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--breakdown",
        choices=[*TRAIN_CASES, "none"],
        default="phase1",
        help="case whose step parts are timed separately (extra steps after its throughput)",
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler over the breakdown case's steps")
    parser.add_argument("--ema", action="store_true", help="include the EMA update train_progressive.py does")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the frozen backbone and encoder (compile_frozen)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="output record (default: benchmarks/results/throughput_*.json)")
    args = parser.parse_args(argv)
    if args.image_size % 32 or args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--image-size must be a multiple of 32, --batch-size and --steps ≥ 1, --warmup ≥ 0")
    if args.breakdown not in ("none", *args.cases):
        parser.error(f"--breakdown {args.breakdown} is not among --cases")
    decoder = get_variant(args.variant).decoder
    cells = sum((args.image_size // stride) ** 2 for stride in decoder.feat_strides)
    if cells < decoder.num_queries:
        # Query selection takes the top num_queries feature cells, so smaller inputs cannot run.
        parser.error(
            f"--image-size {args.image_size} gives {args.variant} {cells} cells < {decoder.num_queries} queries"
        )
    return args


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, boxes_per_image: int, device: torch.device, seed: int
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Random images float32 B×3×S×S in [0, 1] and per image ``boxes_per_image`` random labels int64 [n] and boxes
    float32 [n, 4] normalised cxcywh (inside the image)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
    targets = []
    for _ in range(batch_size):
        sizes = 0.05 + 0.35 * torch.rand(boxes_per_image, 2, generator=generator)
        centres = sizes / 2 + (1 - sizes) * torch.rand(boxes_per_image, 2, generator=generator)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], dim=1).to(device)})
    return images.to(device), targets


@dataclass
class Case:
    """One model ready to be timed: a training phase's setup (``multimodal.train.step``), or an eval-mode model."""

    model: nn.Module
    trainable_params: int
    setup: Phase | None = None


def build_case(name: str, args: argparse.Namespace, device: torch.device) -> Case:
    """The model (and for training the phase setup train_progressive.py uses) of case ``name``, seeded by ``args``.

    ``full`` is phase 0's recipe (the official fine-tune: every part at the variant's LR and weight decay); the
    phases are their default config sections. The EMA is left out unless ``--ema``.
    """
    torch.manual_seed(args.seed)
    variant = get_variant(args.variant)
    detector = build_detector(args.variant, args.num_classes, eval_size=(args.image_size, args.image_size))
    constants = constant_parameters(detector)  # the freshly built model's non-trainable tensors
    text = nn.functional.normalize(torch.randn(args.num_classes, TEXT_DIM), dim=-1)  # random unit class embeddings
    model = MultimodalDetector(detector) if name == "full" else attach_text(detector, text)
    model.to(device)
    if name == "eval":
        model.requires_grad_(False).eval()
        if args.compile:
            compile_frozen_parts(model.parts())
        return Case(model, trainable_params=0)
    index = 0 if name == "full" else int(name.removeprefix("phase"))
    phase = replace(TrainConfig().phase(index), ema=args.ema, amp=args.amp is not False, amp_on_cpu=args.amp is True)
    setup = build_phase(
        index=index,
        config=phase,
        model=model,
        constants=constants,
        variant=variant,
        num_classes=args.num_classes,
        device=device,
        compile_frozen=args.compile,
    )
    setup.train_mode()
    return Case(model, setup.trainable_count(), setup)


class PartTimer:
    """Wall time of consecutive parts of a step, the device synchronised at every boundary; means in ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.steps = 0
        self._last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.steps += 1
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.totals[part] = self.totals.get(part, 0.0) + now - self._last
        self._last = now

    def watch(self, module: nn.Module, part: str) -> list[RemovableHandle]:
        """Also time every call of ``module`` (nested inside another part) under ``part``."""
        started: list[float] = []

        def before(*_) -> None:
            synchronize(self.device)
            started.append(time.perf_counter())

        def after(*_) -> None:
            synchronize(self.device)
            self.totals[part] = self.totals.get(part, 0.0) + time.perf_counter() - started.pop()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def means_ms(self) -> dict[str, float]:
        return {part: 1000 * total / max(1, self.steps) for part, total in self.totals.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_step(case: Case, postprocessor: PostProcessor, images: Tensor, sizes: Tensor, amp: bool) -> None:
    """Eval forward and post-processing to top-300 detections (bf16 autocast when ``amp``), without autograd."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        postprocessor(case.model(images), sizes)


def step_seconds(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time of each of ``warmup`` + ``steps`` steps, synchronised at every step boundary (warm-up ones first)."""
    times = []
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device) -> int:
    """Start measuring a case's peak memory; on CPU returns the resident set size in KiB (-1 where unmeasurable)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:
        # Hand the previous case's freed heap back to the OS, else this case reuses it and shows no growth.
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's high-water mark VmHWM
        return _proc_status_kib("VmRSS")
    except (OSError, AttributeError):  # not Linux with glibc
        return -1


def peak_memory_mib(device: torch.device, start_rss_kib: int) -> float | None:
    """CUDA: ``max_memory_allocated``; CPU: the peak resident set size above the RSS at the reset; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return None if start_rss_kib < 0 else (_proc_status_kib("VmHWM") - start_rss_kib) / 1024


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, top: int = 15) -> dict:
    """torch.profiler over ``steps`` steps: per step the host (CPU) op time, the aten op calls (nested ones included),
    the scalar reads (``.item()`` and the like) and on CUDA the kernels and host-device syncs; plus the ``top`` ops by
    self time (device time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.events()
    # Kernels also appear as entries of their own; ranking only host-side ops counts each kernel's time once.
    averages = [a for a in prof.key_averages() if a.device_type == DeviceType.CPU]
    on_cuda = device.type == "cuda"

    def self_us(avg) -> float:
        return avg.self_device_time_total if on_cuda else avg.self_cpu_time_total

    ranked = sorted((a for a in averages if self_us(a) > 0), key=self_us, reverse=True)[:top]
    total_us = sum(self_us(a) for a in averages)
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    return {
        "steps": steps,
        "time_kind": "self device time" if on_cuda else "self CPU time",
        "host_ms_per_step": sum(a.self_cpu_time_total for a in averages) / 1000 / steps,
        "aten_ops_per_step": len(cpu_ops) / steps,
        "scalar_reads_per_step": sum(e.name == "aten::_local_scalar_dense" for e in cpu_ops) / steps,
        "kernels_per_step": len(kernels) / steps if on_cuda else None,
        "stream_syncs_per_step": sum(e.name in CUDA_SYNCS for e in events) / steps if on_cuda else None,
        "top_ops": [
            _op_row(a.key, self_us(a) / steps, self_us(a) / max(total_us, 1e-9), a.count / steps) for a in ranked
        ],
    }


def _op_row(op: str, us_per_step: float, share: float, calls_per_step: float) -> dict:
    return {"op": op, "ms_per_step": us_per_step / 1000, "share": share, "calls_per_step": calls_per_step}


def run_case(name: str, args: argparse.Namespace, device: torch.device, batch: tuple[Tensor, list[dict]]) -> dict:
    """Build case ``name``, time it and (when it is the breakdown case) time its parts and profile it."""
    images, targets = batch
    start_rss = reset_peak_memory(device)
    case = build_case(name, args, device)
    amp = uses_bf16(args.amp is not False, args.amp is True, device)
    if name == "eval":
        postprocessor = PostProcessor(args.num_classes)
        sizes = torch.tensor([[args.image_size, args.image_size]], device=device).expand(len(images), -1)
        step = partial(eval_step, case, postprocessor, images, sizes, amp)
    else:
        step = partial(train_step, case.setup, images, targets, 0)
    all_times = step_seconds(step, args.steps, args.warmup, device)
    times = all_times[args.warmup :]
    seconds = sum(times) / len(times)
    result = {
        "images_per_s": len(images) / seconds,
        "ms_per_step": 1000 * seconds,
        # A shared machine's stalls show as a median or minimum far below the mean.
        "ms_per_step_median": 1000 * statistics.median(times),
        "ms_per_step_min": 1000 * min(times),
        "first_step_s": all_times[0],  # includes cuDNN autotuning and, with --compile, the compilation
        "peak_memory_mib": peak_memory_mib(device, start_rss),
        "trainable_params": case.trainable_params,
        "total_params": sum(p.numel() for p in case.model.parameters()),
    }
    if name == args.breakdown:
        timer = PartTimer(device)
        hooks = timer.watch(case.setup.criterion.matcher, "matcher")
        for _ in range(args.steps):
            timer.start()
            train_step(case.setup, images, targets, 0, timer.lap)
        result["breakdown_ms"] = timer.means_ms()
        for hook in hooks:
            hook.remove()
        if args.profile:
            result["profile"] = profile_steps(step, min(args.steps, 3), device)
    return result


def format_table(results: dict[str, dict], memory_label: str) -> str:
    rows = [("case", "img/s", "ms/step", "median ms", memory_label, "vs full", "trainable")]
    for name, result in results.items():
        memory, speedup = result["peak_memory_mib"], result.get("speedup_vs_full")
        times = (f"{result[key]:.1f}" for key in ("ms_per_step", "ms_per_step_median"))
        rows.append(
            (
                name,
                f"{result['images_per_s']:.2f}",
                *times,
                "n/a" if memory is None else f"{memory:.0f} MiB",
                "-" if speedup is None else f"{speedup:.2f}x",
                f"{result['trainable_params']:,}",
            )
        )
    return "\n".join(f"{row[0]:<8}" + "".join(f"{cell:>15}" for cell in row[1:]) for row in rows)


def format_breakdown(name: str, parts_ms: dict[str, float]) -> str:
    total = sum(ms for part, ms in parts_ms.items() if part != "matcher")  # the matcher is inside the criterion
    parts = "  ".join(f"{part} {ms:.1f} ms ({ms / total:.0%})" for part, ms in parts_ms.items())
    return f"breakdown of {name} (synchronised, matcher ⊂ criterion): {parts}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    batch = synthetic_batch(args.batch_size, args.image_size, args.num_classes, args.boxes_per_image, device, args.seed)
    results = {name: run_case(name, args, device, batch) for name in args.cases}
    if "full" in results:
        for result in results.values():
            result["speedup_vs_full"] = result["images_per_s"] / results["full"]["images_per_s"]

    memory_label = "peak alloc" if device.type == "cuda" else "peak RSS delta"
    precision = "bf16 autocast" if uses_bf16(args.amp is not False, args.amp is True, device) else "float32"
    print(
        f"{args.variant} bs {args.batch_size} {args.image_size}px on {device_name(device)}, {precision}, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(format_table(results, memory_label))
    for name, result in results.items():
        if "breakdown_ms" in result:
            print(format_breakdown(name, result["breakdown_ms"]))

    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    path = args.json or RESULTS_DIR / f"throughput_{slug}_{args.variant}_{args.batch_size}_{args.image_size}.json"
    record = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "precision": precision,
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS delta (approximate)",
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
