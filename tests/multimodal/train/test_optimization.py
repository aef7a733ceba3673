"""ModelEMA: exact per-tensor averaging of the tracked tensors only, also after tensors are replaced or the model is."""

import copy
import math

import torch
from torch import Tensor, nn

from multimodal.train.optimization import ModelEMA

DECAY, WARMUPS = 0.9, 2
UNTRACKED = ("0.weight", "1.running_var")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(model: nn.Module, generator: torch.Generator) -> None:
    """Moves every parameter and the BatchNorm statistics (``num_batches_tracked`` is an int64 buffer)."""
    model.train()
    model(torch.randn(16, 4, generator=generator))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _slow_ema(start: dict[str, Tensor], history: list[dict[str, Tensor]], tracked: list[str]) -> dict[str, Tensor]:
    """The EMA name by name from each update's state_dict, one lerp per tensor."""
    ema = {name: value.clone() for name, value in start.items()}
    for n, state in enumerate(history, start=1):
        d = DECAY * (1 - math.exp(-n / WARMUPS))
        for name in tracked:
            if ema[name].is_floating_point():
                ema[name].lerp_(state[name], 1 - d)
            else:
                ema[name].copy_(state[name])
    return ema


def _tracked(model: nn.Module) -> list[str]:
    return [name for name in model.state_dict() if name not in UNTRACKED]


def test_ema_after_updates_equals_per_tensor_reference_and_leaves_untracked_tensors_alone():
    model, generator = _model(), torch.Generator().manual_seed(1)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    ema = ModelEMA(model, _tracked(model), DECAY, WARMUPS)
    history = []
    for _ in range(5):
        _train_step(model, generator)
        ema.update(model)
        history.append({name: value.clone() for name, value in model.state_dict().items()})

    expected = _slow_ema(start, history, _tracked(model))
    result = ema.module.state_dict()
    assert ema.updates == 5
    assert all(torch.equal(result[name], expected[name]) for name in expected)
    for name in UNTRACKED:
        assert torch.equal(result[name], start[name]) and not torch.equal(model.state_dict()[name], start[name])
    assert result["1.num_batches_tracked"].item() == 5


def test_ema_follows_replaced_tensors_and_a_new_model_object():
    model, generator = _model(), torch.Generator().manual_seed(2)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    ema = ModelEMA(model, _tracked(model), DECAY, WARMUPS)
    history = []
    for step in range(4):
        _train_step(model, generator)
        if step == 1:
            # Assignment (as .to(other device) does for buffers) replaces the tensor object an earlier update saw.
            model[1].running_mean = torch.full((8,), 5.0)
            model[3].weight = nn.Parameter(torch.ones(3, 8))
        if step == 2:
            model = copy.deepcopy(model)
        ema.update(model)
        history.append({name: value.clone() for name, value in model.state_dict().items()})

    expected = _slow_ema(start, history, _tracked(model))
    result = ema.module.state_dict()
    assert all(torch.equal(result[name], expected[name]) for name in expected)
    assert result["1.running_mean"].mean() > 1.0  # pulled towards the replacement's 5.0
