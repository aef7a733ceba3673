"""Where a phase starts: one meaning per flag (--resume, --init, neither), the refusals, and a resumed run's config."""

import pytest
import torch

from deim_lib.errors import CheckpointError
from multimodal.config import ConfigError, config_to_dict, load_config
from multimodal.train.checkpoint import (
    PhaseCheckpoint,
    PhaseProgress,
    RunInfo,
    TrainingState,
    checkpoint_path,
    rng_state,
    save_phase_checkpoint,
)
from multimodal.train.start import open_resume, resolve_start

DATA = [f"data.{key}=x" for key in ("train_images", "train_annotations", "val_images", "val_annotations")]


def write(directory, phase: int, kind: str, finished: bool = False, epochs: int = 2, seed: int = 0) -> PhaseCheckpoint:
    """A small phase checkpoint (one-tensor 'weights': where a phase starts does not load them into a model)."""
    config = load_config(None, [*DATA, f"phase{phase}.epochs={epochs}"])
    last = kind == "last"
    checkpoint = PhaseCheckpoint(
        phase=phase,
        kind=kind,
        info=RunInfo("atto", 320, ["a", "b"], [1, 2], config_to_dict(config), seed),
        progress=PhaseProgress(TrainingState(epoch=1, batch=3, step=7), ["run0", f"run{phase}"]),
        detector={"w": torch.zeros(1)},
        fusion={"f": torch.zeros(1)} if phase else {},
        ema_detector={"w": torch.ones(1)},
        ema_fusion={"f": torch.ones(1)} if phase else {},
        ema_updates=7,
        text_embeddings=None,
        finished=finished,
        optimizer={"state": {}, "param_groups": []} if last else None,
        rng=rng_state() if last else None,
    )
    save_phase_checkpoint(checkpoint_path(directory, phase, kind), checkpoint)
    return checkpoint


def resume(directory, phase: int | None, *overrides: str, eval_only: bool = False, seed: int | None = None, at=None):
    path = at or checkpoint_path(directory, phase, "last")
    return open_resume(str(path), None, list(overrides), phase, eval_only, seed)


def test_resume_continues_from_the_training_weights_and_eval_only_from_the_ema(tmp_path):
    write(tmp_path, 2, "last")
    start = resume(tmp_path, None, at=checkpoint_path(tmp_path, 2, "last")).start
    assert start.resume.phase == 2 and torch.equal(start.detector_state["w"], torch.zeros(1))
    assert "phase 2, epoch 2, step 7" in start.description
    evaluated = resume(tmp_path, 2, eval_only=True).start
    assert torch.equal(evaluated.detector_state["w"], torch.ones(1))


def test_resume_refuses_a_best_file_another_phase_and_a_finished_phase(tmp_path):
    write(tmp_path, 1, "best")
    write(tmp_path, 1, "last", finished=True)
    with pytest.raises(CheckpointError, match="holds the best weights of phase 1, not a resume point"):
        resume(tmp_path, None, at=checkpoint_path(tmp_path, 1, "best"))
    last = checkpoint_path(tmp_path, 1, "last")
    with pytest.raises(CheckpointError, match="a phase-1 checkpoint; --resume continues that same phase"):
        resume(tmp_path, 2, at=last)
    with pytest.raises(CheckpointError, match=r"phase 1 is finished .* --eval-only"):
        resume(tmp_path, 1)
    assert resume(tmp_path, 1, eval_only=True).start.resume is not None
    assert resume(tmp_path, 1, "phase1.epochs=3").start.resume is not None  # more epochs extend a finished phase
    with pytest.raises(CheckpointError, match="pass only one"):
        open_resume(str(last), None, [], 1, False, None, init="y")


def test_a_resumed_run_keeps_its_config_and_seed_and_says_what_changed(tmp_path):
    write(tmp_path, 1, "last", epochs=2, seed=5)
    resumed = resume(tmp_path, 1, "phase1.epochs=4", "monitor.max_ap_drop=0.2")
    assert resumed.seed == 5 and resumed.config.phase1.epochs == 4
    assert "monitor.max_ap_drop: 0.05 → 0.2" in resumed.changes
    spans = "phase1.epochs: 2 → 4 (the LR schedule of phase 1 now spans 4 epochs"
    assert any(line.startswith(spans) for line in resumed.changes)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in what phase 1 trains \(phase1.lr"):
        resume(tmp_path, 1, "phase1.lr=0.001")
    with pytest.raises(ConfigError, match="trained with --seed 5, not 6"):
        resume(tmp_path, 1, seed=6)
    assert resume(tmp_path, 1, seed=5).seed == 5


def test_init_and_the_defaults_start_from_earlier_weights_only(tmp_path):
    config = load_config(None, DATA)
    write(tmp_path, 1, "best")
    write(tmp_path, 1, "last")
    start = resolve_start(2, config, tmp_path)  # neither flag: phase1_best.pth of the output directory
    assert "best weights of phase 1" in start.description and torch.equal(start.detector_state["w"], torch.ones(1))
    start = resolve_start(3, config, tmp_path, init=str(checkpoint_path(tmp_path, 1, "last")))
    assert any("its best epoch is in" in note for note in start.notes)
    assert any("skipping phase 2" in note for note in start.notes)
    with pytest.raises(CheckpointError, match="a phase-1 checkpoint cannot start phase 1"):
        resolve_start(1, config, tmp_path, init=str(checkpoint_path(tmp_path, 1, "best")))
    assert resolve_start(0, config, tmp_path / "empty").description == "a freshly initialised detector"
    with pytest.raises(CheckpointError, match="--phase 2: nothing to start from"):
        resolve_start(2, config, tmp_path / "empty")
