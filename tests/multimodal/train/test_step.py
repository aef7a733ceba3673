"""The phase set-up and the training step on their own: what trains, a non-finite step skipped with nothing changed,
a diverged model never saved, a resume point that does not fit refused."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.throughput import synthetic_batch
from deim_lib import build_detector
from deim_lib.errors import CheckpointError
from deim_lib.variants import get_variant
from multimodal.config import TrainConfig
from multimodal.model.detector import attach_text
from multimodal.train.checkpoint import PhaseProgress, RunInfo, TrainingState
from multimodal.train.freezing import constant_parameters
from multimodal.train.step import TrainingError, build_phase, checkpoint_now, restore_phase, train_step

CPU = torch.device("cpu")


def phase_two(**changes):
    torch.manual_seed(0)
    detector = build_detector("atto", 3, eval_size=(160, 160))
    constants = constant_parameters(detector)
    model = attach_text(detector, F.normalize(torch.randn(3, 16), dim=-1))
    phase = replace(TrainConfig().phase2, **changes)
    setup = build_phase(
        index=2, config=phase, model=model, constants=constants, variant=get_variant("atto"), num_classes=3, device=CPU
    )
    setup.train_mode()
    return setup


def batch():
    return synthetic_batch(2, 160, 3, 2, CPU, seed=0)


def test_phase_two_trains_the_fusion_and_the_class_heads_only():
    setup = phase_two()
    assert setup.frozen_parts() == ["backbone", "encoder", "box_heads"]
    heads = setup.parts["class_heads"]
    expected = sum(p.numel() for m in (*heads, setup.model.fusion) for p in m.parameters())
    assert setup.trainable_count() == expected and not setup.use_amp  # float32 on the CPU by default


def test_a_step_that_turns_non_finite_is_skipped_and_changes_nothing(monkeypatch):
    setup = phase_two()
    before = {name: value.clone() for name, value in setup.model.state_dict().items()}
    real = setup.criterion.forward
    monkeypatch.setattr(
        setup.criterion, "forward", lambda *a, **k: {n: v * float("nan") for n, v in real(*a, **k).items()}
    )
    _, taken = train_step(setup, *batch(), epoch=0)
    assert not taken and not setup.optimizer.state  # AdamW never stepped
    assert all(torch.equal(before[name], value) for name, value in setup.model.state_dict().items())
    monkeypatch.undo()
    losses, taken = train_step(setup, *batch(), epoch=0)
    assert taken and all(torch.isfinite(value) for value in losses.values())


def test_a_model_with_nan_weights_is_never_saved_and_a_resume_point_must_fit():
    setup = phase_two()
    info = RunInfo("atto", 160, ["a", "b", "c"], [1, 2, 3], {}, 0)
    progress = PhaseProgress(TrainingState(), ["run0"])
    saved = checkpoint_now(setup, info, progress, None, "last")
    assert saved.ema_detector is not None and saved.optimizer is not None and saved.rng is not None
    with torch.no_grad():
        setup.model.fusion.levels[0].output.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"phase 2: the weights hold NaN or inf \(e.g. fusion.levels.0.output"):
        checkpoint_now(setup, info, progress, None, "last")
    without_ema = replace(saved, ema_detector=None, ema_fusion=None)
    with pytest.raises(CheckpointError, match="the checkpoint has no EMA weights but this phase uses EMA"):
        restore_phase(phase_two(), without_ema)
    other_phase = phase_two(trainable=["fusion"])
    with pytest.raises(CheckpointError, match="the optimizer state does not fit this phase's parameters"):
        restore_phase(other_phase, saved)
