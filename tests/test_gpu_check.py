"""benchmarks/gpu_check.sh, prepared for the day a GPU is lent: its dry run passes every step on the CPU, and the
arguments of its real run parse, so that the GPU run cannot fail on a typo."""

import json
import os
import subprocess
import sys

import train_progressive
from benchmarks import ddp_check, gpu_check, throughput
from multimodal.config import load_config
from tests.conftest import SHARED_DIR

RECORDS = ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_gpu_check_dry_run_passes_every_step_on_the_cpu(tmp_path, real_atto, coco_clip, datasets_dir):
    out = tmp_path / "out"
    arguments = ["--dry-run", "--device", "cpu", "--out", str(out), "--shared", str(SHARED_DIR), "--budget-s", "900"]
    command = ["bash", "benchmarks/gpu_check.sh", *arguments]
    environment = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=gpu_check.ROOT, env=environment, capture_output=True, text=True)
    record = json.loads((out / "gpu_check.json").read_text())
    failed = [row for row in record["steps"] if row["status"] != "ok"]
    assert finished.returncode == 0 and failed == [], finished.stdout[-4000:] + finished.stderr[-2000:]
    assert [row["step"] for row in record["steps"]] == [name for name, _, _ in gpu_check.plan(gpu_check.DRY_RUN)]
    throughput_records = [f"throughput_cpu_{name}.json" for name in gpu_check.DRY_RUN.throughput]
    assert sorted(path.name for path in out.iterdir()) == sorted(RECORDS + throughput_records)
    assert record["phase2_killed_at_step"] == 1  # of 2 steps an epoch: mid-epoch
    assert record["ddp"]["world_size"] == 2 and record["ddp"]["backend"] == "gloo"


def test_gpu_check_real_run_arguments_parse(tmp_path):
    """What only the GPU run uses: its throughput, DDP and training arguments, its counts and its records."""
    full = gpu_check.FULL
    for arguments in full.throughput.values():
        parsed = throughput.parse_args([*arguments, *full.throughput_steps, "--device", "cuda"])
        assert parsed.variant in ("s", "m") and parsed.batch_size == 16 and parsed.image_size == 640
    assert ddp_check.parse_args([*full.ddp, "--device", "cuda", "--json", "ddp.json"]).image_size == 320
    assert len(RECORDS) + len(full.throughput) <= 8  # the device tool brings back at most 8 files
    # Phase 2 is killed at its first checkpoint, mid-epoch, with an epoch after it.
    assert full.checkpoint_every_steps < 80 // gpu_check.BATCH_SIZE and full.phase2_epochs >= 2

    args = gpu_check.parse_args(["--out", str(tmp_path), "--shared", str(SHARED_DIR)])
    data = gpu_check.prepare_data(full, args.shared, tmp_path)
    run = gpu_check.Run(args, full, tmp_path, data, log_path=tmp_path / "gpu_check.log", deadline=0)
    arguments = run.train("--phase", "2", "--resume", str(tmp_path / "run" / "phase2_last.pth"))
    parsed = train_progressive.parse_args(arguments[1:])
    config = load_config(parsed.config, parsed.set)
    assert parsed.device == "cuda" and config.phase2.checkpoint_every_steps == full.checkpoint_every_steps
    assert config.data.train_annotations == str(SHARED_DIR / "datasets/coco-tiny/annotations/instances_train2017.json")
