"""torchrun integration: process group from the environment, device per rank, unwrapping, small collectives.

A plain ``python train_progressive.py`` run is a world of one process and touches none of torch.distributed.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from deim_lib.errors import UserError


class DeviceError(UserError):
    """The requested device is not available; the message says what to pass instead."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistributedContext:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; NCCL on GPUs, gloo on CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here; pass --device cpu")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistributedContext(rank, local_rank, world_size, torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (the model itself without one)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_distributed(model: nn.Module, device: torch.device, world_size: int, find_unused: bool) -> nn.Module:
    """DDP around the model after freezing, per phase: it registers gradient hooks for what is trainable now.

    ``find_unused``: some trainable parameters may get no gradient in a step (training the decoder, a batch without
    boxes leaves the denoising embedding unused).
    """
    if world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """``value`` from rank 0 on every rank (identity in a single process)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (e.g. "the loss is finite": all ranks skip a step together)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def replicas_identical(model: nn.Module, device: torch.device) -> bool:
    """Whether every rank holds the same trainable weights, compared through an exact float64 fingerprint."""
    if not dist.is_initialized():
        return True
    generator = torch.Generator().manual_seed(0)
    fingerprint = torch.zeros(3, dtype=torch.float64)
    for _, parameter in sorted(model.named_parameters()):
        values = parameter.detach().to("cpu", torch.float64).flatten()
        weights = torch.rand(values.numel(), generator=generator, dtype=torch.float64)
        fingerprint += torch.stack([values.sum(), values.square().sum(), (values * weights).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint.to(device) if device.type == "cuda" else fingerprint)
    return all(torch.equal(gathered[0].cpu(), other.cpu()) for other in gathered[1:])
