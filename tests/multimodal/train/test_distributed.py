"""The distributed helpers in one process (identities) and in two real gloo processes (agreement, broadcast, the
replica check)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from multimodal.train import distributed


def test_in_one_process_every_helper_is_the_identity(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.setup_distributed("cpu")
    assert (context.rank, context.world_size, context.device.type, context.is_main) == (0, 1, "cpu", True)
    assert not dist.is_initialized()
    model = nn.Linear(2, 2)
    assert distributed.wrap_distributed(model, context.device, 1, find_unused=False) is model
    assert distributed.unwrap(model) is model
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_ranks_agree(False, context.device) is False
    assert distributed.replicas_identical(model, context.device)


def test_cuda_without_a_gpu_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(distributed.DeviceError, match="--device cuda: no CUDA device is available here"):
        distributed.setup_distributed("cuda")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    context = distributed.setup_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        same = distributed.replicas_identical(model, context.device)
        with torch.no_grad():
            model.bias[0] += rank * 1e-7  # one rank drifts by a last bit
        drifted = distributed.replicas_identical(model, context.device)
        wrapped = distributed.wrap_distributed(model, context.device, context.world_size, find_unused=False)
        results[rank] = {
            "same": same,
            "drifted": drifted,
            "agree": distributed.all_ranks_agree(rank == 0, context.device),
            "broadcast": distributed.broadcast_object(f"from rank {rank}"),
            "unwrapped": distributed.unwrap(wrapped) is model,
        }
    finally:
        distributed.cleanup_distributed()


def test_two_gloo_processes_agree_broadcast_and_see_a_replica_that_drifted():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank] == {
            "same": True,
            "drifted": False,
            "agree": False,  # rank 1 said no: every rank skips
            "broadcast": "from rank 0",
            "unwrapped": True,
        }
