"""DDP and the collectives through the project's own code, in a process group of torchrun's processes (NCCL on CUDA,
gloo on the CPU), also a group of one: ``torchrun --nproc_per_node=1 train_progressive.py`` starts no process group
(a world of one process needs none), so on a machine with one GPU this is where NCCL runs.

    torchrun --nproc_per_node=1 benchmarks/ddp_check.py --device cuda --json ddp.json
    torchrun --nproc_per_node=2 benchmarks/ddp_check.py --device cpu --json ddp.json

Per process, two training steps of phase 0 (on CUDA with every BatchNorm a SyncBatchNorm, as train_progressive.py
converts the detector for several GPUs) and two of phase 1, each set up by ``build_phase`` with its
DistributedDataParallel wrapper; then the end-of-phase check that all processes hold the same weights, the gather of
evaluation detections and the broadcast of the text embeddings. Rank 0 writes the record; a failed check raises.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Run as ``torchrun benchmarks/ddp_check.py``: the project packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import synthetic_batch
from deim_lib import build_detector, get_variant
from deim_lib.evaluate import gather_detections
from multimodal.config import TrainConfig
from multimodal.model.detector import MultimodalDetector, attach_text
from multimodal.train import distributed
from multimodal.train.freezing import constant_parameters
from multimodal.train.step import build_phase, train_step

NUM_CLASSES = 5
TEXT_DIM = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--variant", default="atto")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=4, help="images per process")
    parser.add_argument("--json", type=Path, required=True, help="the record rank 0 writes")
    return parser.parse_args(argv)


def check_phase(index: int, args: argparse.Namespace, context: distributed.DistributedContext) -> dict:
    """Two DDP training steps of phase ``index`` and the end-of-phase replica check; what they showed."""
    torch.manual_seed(0)  # the same initial weights and text on every process, as after loading a checkpoint
    size = args.image_size
    detector = build_detector(args.variant, NUM_CLASSES, eval_size=(size, size))
    if index == 0 and context.device.type == "cuda":
        detector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(detector)
    constants = constant_parameters(detector)
    text = F.normalize(torch.randn(NUM_CLASSES, TEXT_DIM), dim=-1)
    model = MultimodalDetector(detector) if index == 0 else attach_text(detector, text)
    model.to(context.device)
    # build_phase wraps the model only for a world of several processes; a group of one (one GPU) gets it too here.
    wrapped_world = max(context.world_size, 2)
    phase = TrainConfig().phase(index)
    variant = get_variant(args.variant)
    setup = build_phase(
        index=index,
        config=phase,
        model=model,
        constants=constants,
        variant=variant,
        num_classes=NUM_CLASSES,
        device=context.device,
        world_size=wrapped_world,
    )
    if not isinstance(setup.net, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(f"phase {index}: build_phase gave no DistributedDataParallel wrapper")
    setup.train_mode()
    images, targets = synthetic_batch(
        args.batch_size, size, NUM_CLASSES, 3, context.device, seed=100 * context.rank + index
    )
    losses = []
    for _ in range(2):
        terms, taken = train_step(setup, images, targets, epoch=0)
        if not taken:
            raise RuntimeError(f"phase {index}: a DDP step was skipped (non-finite loss, outputs or gradients)")
        losses.append(float(sum(terms.values()).detach()))
    if not distributed.replicas_identical(setup.model, context.device):
        raise RuntimeError(f"phase {index}: the processes hold different weights after DDP steps")
    sync_norms = sum(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules())
    return {"losses": losses, "bf16": setup.use_amp, "sync_batchnorm_layers": sync_norms, "ema": setup.ema.updates}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = distributed.setup_distributed(args.device)
    if not dist.is_initialized():  # a world of one process: the project starts no group, this check does
        dist.init_process_group(backend="nccl" if context.device.type == "cuda" else "gloo")
    try:
        record = {
            "backend": dist.get_backend(),
            "world_size": context.world_size,
            **{f"phase{index}": check_phase(index, args, context) for index in (0, 1)},
        }
        gathered = gather_detections([{"image_id": context.rank, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}])
        if sorted(detection["image_id"] for detection in gathered) != list(range(context.world_size)):
            raise RuntimeError(f"gather_detections returned {gathered}")
        text = distributed.broadcast_object({"rank": context.rank} if context.is_main else None)
        if text != {"rank": 0}:
            raise RuntimeError(f"broadcast_object returned {text} on rank {context.rank}")
        if context.is_main:
            args.json.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps(record))
    finally:
        distributed.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
