"""Epoch records and metrics.jsonl: the JSON of a record is what it was, a record round-trips, only the current run's
records count (each epoch once), and unreadable lines are reported once and skipped."""

import json

import numpy as np
import pytest

from multimodal.train.records import Baseline, EpochRecord, MetricsLog, Reliance, TextFigures, epoch_record

BASELINE = Baseline(0.5, 0.7, {"a": {"AP": 0.5, "AP50": 0.7}}, "measured", "base", "val")
RELIANCE = {"AP_permuted": 0.5, "permuted": 0.02, "AP_mean": 0.51, "mean": 0.01}


def metrics(ap: float, text: dict | None = None) -> dict:
    text = {"added_signal": [0.01, 0.02], "classifier_bias": None} if text is None else text
    return {"AP": ap, "AP50": ap + 0.2, "per_class": {"a": {"AP": ap, "AP50": ap + 0.2}}, "text": text}


def record(run_id: str, epoch: int, ap: float, phase: int = 1) -> EpochRecord:
    return epoch_record(run_id, phase, epoch, metrics(ap), {"loss": 1.0}, BASELINE)


def test_the_json_of_a_record_keeps_its_keys_and_their_order():
    text = {"added_signal": [0.01, 0.02], "classifier_bias": 0.3, "reliance": RELIANCE}
    stats = {"loss": 1.0, "loss_mal": 0.5, "lr": 2e-4, "images_per_s": 3.0, "seconds": 1.0, "step": 4}
    data = epoch_record("r1", 1, 2, metrics(0.52, text), stats | {"epoch_seconds": 2.0}, BASELINE).to_dict()
    assert list(data) == [
        *("run_id", "phase", "epoch", "AP", "AP50", "per_class", "text", "train"),
        *("delta_AP", "delta_AP50", "delta_per_class"),
    ]
    assert list(data["text"]) == ["added_signal", "classifier_bias", "reliance"]
    assert list(data["text"]["reliance"]) == ["AP_permuted", "permuted", "AP_mean", "mean"]
    assert data["delta_AP"] == pytest.approx(0.02) and data["delta_per_class"] == {"a": pytest.approx(0.02)}
    assert data["train"] == stats | {"epoch_seconds": 2.0} and data["text"] == text


@pytest.mark.parametrize(
    "text", [{}, {"added_signal": [0.1], "classifier_bias": None}, {"added_signal": [0.1], "classifier_bias": 0.2}]
)
def test_a_record_with_or_without_text_or_reliance_round_trips(text):
    for phase, baseline in ((0, BASELINE), (1, None), (2, BASELINE)):
        original = epoch_record("r1", phase, 1, metrics(0.5, text), {"loss": 1.0}, baseline)
        data = json.loads(json.dumps(original.to_dict()))
        assert EpochRecord.from_dict(data) == original and data["text"] == text
        assert ("delta_AP" in data) == (phase > 0 and baseline is not None)
    with_reliance = epoch_record(
        "r1", 1, 1, metrics(0.5, {**text, "added_signal": [0.1], "reliance": RELIANCE}), {}, None
    )
    assert with_reliance.text.reliance == Reliance(0.5, 0.02, 0.51, 0.01)
    assert EpochRecord.from_dict(with_reliance.to_dict()) == with_reliance
    assert TextFigures.from_dict({}) == TextFigures() and TextFigures().to_dict() == {}


def test_only_the_current_run_counts_and_a_torn_line_is_skipped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(record("old", 1, 0.45))
    with path.open("a") as log:
        log.write('{"run_id": "old", "pha')  # killed mid-write
    log = MetricsLog(path)
    log.append(record("new", 1, 0.52))
    assert [r.run_id for r in log.records(["new"])] == ["new"]
    assert "metrics.jsonl:2: unreadable record" in capsys.readouterr().err
    assert [r.AP for r in log.records(["old", "new"])] == [0.45, 0.52]
    assert "unreadable record" not in capsys.readouterr().err  # the log is read once: the warning is not repeated
    # A fresh log of the same file (the next invocation) reads what the file holds now: the fragment stayed a line.
    assert [r.AP for r in MetricsLog(path).records(["new"])] == [pytest.approx(0.52)]
    assert len(path.read_text().splitlines()) == 3


def test_a_resume_from_an_earlier_checkpoint_counts_every_epoch_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append(record("r1", 1, 0.50))
    log.append(record("r1", 2, 0.51))
    # The next invocation resumes from the epoch-1 checkpoint (same run id) and writes epoch 2 again.
    resumed = MetricsLog(path)
    resumed.append(record("r1", 2, 0.55))
    assert [(r.epoch, r.AP) for r in resumed.records(["r1"])] == [(1, 0.50), (2, 0.55)]
    # Resuming from epoch 1 again cuts off epoch 2 of the branch before, even before writing its own epoch 2.
    again = MetricsLog(path)
    again.append(record("r1", 1, 0.49))
    assert [(r.epoch, r.AP) for r in again.records(["r1"])] == [(1, 0.49)]
    # Another phase of the same run is another branch: its epochs do not cut off those of phase 1.
    again.append(record("r1", 1, 0.40, phase=2))
    assert [(r.phase, r.epoch) for r in again.records(["r1"])] == [(1, 1), (2, 1)]


def test_bytes_that_are_not_utf8_are_reported_once_and_skipped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(record("r1", 1, 0.50))
    with path.open("ab") as log:
        log.write(b"\xff\xfe" + np.random.default_rng(0).bytes(300))
    again = MetricsLog(path)
    again.append(record("r1", 2, 0.52))
    assert [r.epoch for r in again.records(["r1"])] == [1, 2]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unreadable record" in line]
    assert len(warnings) == 1 and "metrics.jsonl:2" in warnings[0]
    again.records(["r1"])
    assert "unreadable record" not in capsys.readouterr().err


def test_a_log_that_does_not_write_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, writes=False).append(record("r1", 1, 0.5))
    assert not path.exists()
