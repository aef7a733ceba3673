"""The one checkpoint schema: round trip, the official layout, and one-line errors for other files."""

import pytest
import torch

from deim_lib.errors import CheckpointError
from multimodal.train.checkpoint import (
    PhaseCheckpoint,
    PhaseProgress,
    RunInfo,
    TrainingState,
    read_phase_checkpoint,
    save_phase_checkpoint,
)


def checkpoint(kind: str = "last") -> PhaseCheckpoint:
    last = kind == "last"
    return PhaseCheckpoint(
        phase=1,
        kind=kind,
        info=RunInfo("atto", 320, ["a", "b"], [3, 7], {"fusion": {"num_heads": 8}}, seed=4),
        progress=PhaseProgress(TrainingState(2, 1, 21, 0, 3), ["r0", "r1"], [{"epoch": 1, "AP": 0.1}], 0.1, None),
        detector={"decoder.x": torch.ones(2)},
        fusion={"fusion.levels.0.output.weight": torch.zeros(2, 2)},
        ema_detector={"decoder.x": torch.full((2,), 0.5)},
        ema_fusion={"fusion.levels.0.output.weight": torch.ones(2, 2)},
        ema_updates=21,
        text_embeddings=None,
        finished=False,
        optimizer={"state": {}, "param_groups": []} if last else None,
        rng={"torch": torch.get_rng_state()} if last else None,
    )


def test_round_trip_and_official_layout(tmp_path):
    path = tmp_path / "phase1_last.pth"
    save_phase_checkpoint(path, checkpoint())
    raw = torch.load(path, weights_only=True)
    assert torch.equal(raw["model"]["decoder.x"], torch.ones(2)) and raw["ema"]["updates"] == 21
    assert torch.equal(raw["ema"]["module"]["decoder.x"], torch.full((2,), 0.5)) and "date" in raw
    loaded = read_phase_checkpoint(path)
    assert loaded.info == checkpoint().info and loaded.progress == checkpoint().progress
    assert loaded.progress.run_id == "r1" and loaded.progress.state.nonfinite_total == 3
    detector, fusion = loaded.weights()  # the EMA weights, as evaluation used them
    assert torch.equal(detector["decoder.x"], torch.full((2,), 0.5)) and fusion["fusion.levels.0.output.weight"].all()


def test_a_best_checkpoint_holds_no_optimiser_or_rng(tmp_path):
    path = tmp_path / "phase1_best.pth"
    save_phase_checkpoint(path, checkpoint("best"))
    raw = torch.load(path, weights_only=True)
    assert "optimizer" not in raw and "rng" not in raw and read_phase_checkpoint(path).kind == "best"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("schema"), "another version of train_progressive.py \\(no schema entry"),
        (lambda d: d.pop("category_ids"), "incomplete phase checkpoint \\(bad or missing entry 'category_ids'\\)"),
        (lambda d: d.pop("optimizer"), "a 'last' checkpoint without optimiser or RNG state"),
    ],
)
def test_other_versions_and_incomplete_files_are_one_line_errors(tmp_path, change, message):
    data = checkpoint().to_dict()
    change(data)
    torch.save(data, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=message):
        read_phase_checkpoint(tmp_path / "x.pth")
    torch.save({"model": {}}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of train_progressive\.py"):
        read_phase_checkpoint(tmp_path / "official.pth")
