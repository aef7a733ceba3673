"""The forgetting guard: one base and one validation set per directory, the AP drop it allows, and the best
checkpoint of an earlier run."""

import json

import pytest
import torch

from multimodal.train.checkpoint import PhaseProgress, TrainingState
from multimodal.train.guard import ForgettingGuard, MonitorError, state_fingerprint
from multimodal.train.records import Baseline, epoch_record

PER_CLASS = {"a": {"AP": 0.5, "AP50": 0.7}}


def metrics(ap: float) -> dict:
    return {"AP": ap, "AP50": ap + 0.2, "per_class": {"a": {"AP": ap, "AP50": ap + 0.2}}, "text": {}}


@pytest.fixture
def val_sets(tmp_path):
    """Two validation annotation files with different content."""
    first, second = tmp_path / "val_a.json", tmp_path / "val_b.json"
    first.write_text('{"images": [1]}')
    second.write_text('{"images": [2]}')
    return first, second


def test_fingerprints_tell_bit_different_weights_apart():
    state = {"w": torch.ones(3), "n": torch.tensor(2)}
    assert state_fingerprint(state) == state_fingerprint({k: v.clone() for k, v in state.items()})
    assert state_fingerprint(state) != state_fingerprint(
        {"w": torch.ones(3).nextafter(torch.tensor(2.0)), "n": state["n"]}
    )


def test_a_directory_belongs_to_one_base_and_one_validation_set(tmp_path, val_sets):
    state, (val_a, val_b) = {"w": torch.ones(3)}, val_sets
    out = tmp_path / "out"
    out.mkdir()
    guard = ForgettingGuard(out, max_ap_drop=0.05)
    baseline = guard.adopt_baseline(None, lambda: state, val_a, lambda: metrics(0.5), phase=1)
    assert baseline.AP == 0.5 and baseline.source == "measured at the start of phase 1"
    assert json.loads((out / "baseline.json").read_text())["AP"] == 0.5
    again = ForgettingGuard(out, 0.05)
    measured = []
    assert again.adopt_baseline(None, lambda: state, val_a, lambda: measured.append(1), phase=1) == baseline
    assert measured == []  # the same base again: read back, not measured again
    with pytest.raises(MonitorError, match="holds the run of another base detector"):
        again.adopt_baseline(None, lambda: {"w": torch.zeros(3)}, val_a, lambda: metrics(0.4), phase=1)
    with pytest.raises(MonitorError, match="another validation set"):
        again.adopt_baseline(None, lambda: state, val_b, lambda: metrics(0.4), phase=1)
    with pytest.raises(MonitorError, match=r"data\.val_annotations"):
        again.adopt_baseline(baseline.to_dict(), lambda: state, val_b, lambda: metrics(0.4), phase=2)
    assert Baseline.from_dict(baseline.to_dict()) == baseline


def test_a_guard_that_does_not_write_leaves_the_directory_alone(tmp_path, val_sets):
    guard = ForgettingGuard(tmp_path / "out", 0.05, writes=False)
    guard.adopt_baseline(None, lambda: {"w": torch.ones(3)}, val_sets[0], lambda: metrics(0.5), phase=1)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_baseline_is_refused(tmp_path, val_sets):
    (tmp_path / "baseline.json").write_text("{")
    with pytest.raises(MonitorError, match=r"baseline\.json: unreadable"):
        ForgettingGuard(tmp_path, 0.05).adopt_baseline(None, lambda: {}, val_sets[0], lambda: metrics(0.5), 1)


def test_only_a_drop_beyond_max_ap_drop_exceeds_it():
    guard = ForgettingGuard("unused", max_ap_drop=0.05)
    baseline = Baseline(0.5, 0.7, PER_CLASS, "measured", "base", "val")
    assert not guard.exceeded(epoch_record("r1", 1, 1, metrics(0.52), {}, baseline))
    assert not guard.exceeded(epoch_record("r1", 1, 1, metrics(0.46), {}, baseline))
    assert guard.exceeded(epoch_record("r1", 1, 1, metrics(0.44), {}, baseline))
    assert not guard.exceeded(epoch_record("r1", 0, 1, metrics(0.1), {}, baseline))  # phase 0 trains the base


def test_the_best_checkpoint_of_an_earlier_run_is_named_with_its_score(tmp_path, monkeypatch):
    path = tmp_path / "phase1_best.pth"
    guard = ForgettingGuard(tmp_path, 0.05)
    assert guard.earlier_best(path, ["r1"]) is None  # no file
    path.write_bytes(b"not a checkpoint")
    assert guard.earlier_best(path, ["r1"]) is None  # unreadable: nothing to compare with

    class Written:
        progress = PhaseProgress(TrainingState(), ["r0", "r1"], best_metric=0.42)

    monkeypatch.setattr("multimodal.train.guard.read_phase_checkpoint", lambda _: Written)
    assert guard.earlier_best(path, ["r2"]) == 0.42
    assert guard.earlier_best(path, ["r0", "r1"]) is None  # this run's own best
