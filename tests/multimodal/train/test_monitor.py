"""The forgetting monitor: one base per directory, records of the current run only (each epoch once), unreadable
lines, the text verdict, signed figures and the curves."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from multimodal.train.curves import curves_figure
from multimodal.train.monitor import ForgettingMonitor, MonitorError, format_epoch, signed, state_fingerprint

PER_CLASS = {"a": {"AP": 0.5, "AP50": 0.7}}


def metrics(ap: float, reliance: dict | None = None) -> dict:
    text = {"added_signal": [0.01, 0.02]} | ({"reliance": reliance} if reliance else {})
    return {"AP": ap, "AP50": ap + 0.2, "per_class": {"a": {"AP": ap, "AP50": ap + 0.2}}, "text": text}


def monitor_with_base(directory, state, lineage=("r1",)) -> ForgettingMonitor:
    monitor = ForgettingMonitor(directory, max_ap_drop=0.05)
    monitor.lineage = list(lineage)
    monitor.adopt_baseline(None, lambda: state, "val-A", lambda: metrics(0.5), phase=1)
    return monitor


def test_fingerprints_tell_bit_different_weights_apart():
    state = {"w": torch.ones(3), "n": torch.tensor(2)}
    assert state_fingerprint(state) == state_fingerprint({k: v.clone() for k, v in state.items()})
    assert state_fingerprint(state) != state_fingerprint(
        {"w": torch.ones(3).nextafter(torch.tensor(2.0)), "n": state["n"]}
    )


def test_a_directory_belongs_to_one_base_and_one_validation_set(tmp_path):
    state = {"w": torch.ones(3)}
    monitor = monitor_with_base(tmp_path, state)
    assert json.loads((tmp_path / "baseline.json").read_text())["AP"] == 0.5
    again = ForgettingMonitor(tmp_path, 0.05)
    measured = []
    assert again.adopt_baseline(None, lambda: state, "val-A", lambda: measured.append(1), phase=1).AP == 0.5
    assert measured == []  # the same base again: read back, not measured again
    with pytest.raises(MonitorError, match="holds the run of another base detector"):
        again.adopt_baseline(None, lambda: {"w": torch.zeros(3)}, "val-A", lambda: metrics(0.4), phase=1)
    with pytest.raises(MonitorError, match="another validation set"):
        again.adopt_baseline(None, lambda: state, "val-B", lambda: metrics(0.4), phase=1)
    carried = monitor.baseline.to_dict()
    with pytest.raises(MonitorError, match=r"data\.val_annotations"):
        again.adopt_baseline(carried, lambda: state, "val-B", lambda: metrics(0.4), phase=2)


def test_reports_show_the_current_run_and_skip_a_torn_line(tmp_path, capsys):
    monitor = monitor_with_base(tmp_path, {"w": torch.ones(3)}, lineage=["old"])
    monitor.record(1, 1, metrics(0.45), {"loss": 1.0})
    with monitor.log_path.open("a") as log:
        log.write('{"run_id": "old", "pha')  # killed mid-write
    monitor.lineage = ["new"]
    record = monitor.record(1, 1, metrics(0.52, {"permuted": 0.0, "mean": 0.01}), {"loss": 1.0})
    assert record["delta_AP"] == pytest.approx(0.02) and not monitor.exceeded(record)
    assert [r["run_id"] for r in monitor.records()] == ["new"]
    assert "metrics.jsonl:2: unreadable record" in capsys.readouterr().err
    monitor.write_report()
    report = (tmp_path / "report.md").read_text()
    assert "Run new" in report and "| 1 | 1 | 0.5200 |" in report and "0.4500" not in report
    assert "unreadable record" not in capsys.readouterr().err  # the log is read once: the warning is not repeated
    # A fresh monitor of the same directory (the next invocation) reads what the log holds now.
    again = monitor_with_base(tmp_path, {"w": torch.ones(3)}, lineage=["new"])
    assert [r["AP"] for r in again.records()] == [pytest.approx(0.52)]
    assert "Added signal:" in report and "The text was used" in report
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_the_verdict_says_plainly_whether_the_text_was_used(tmp_path):
    monitor = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    assert "not measured" in monitor.text_verdict()
    monitor.record(1, 1, metrics(0.5, {"permuted": 0.0, "mean": 0.0}), {})
    assert monitor.text_verdict().startswith("The text was not used (phase 1, epoch 1)")
    monitor.record(1, 2, metrics(0.5, {"permuted": 0.0, "mean": 0.0002}), {})
    assert monitor.text_verdict().startswith("The text was barely used (phase 1, epoch 2)")
    monitor.record(1, 3, metrics(0.5, {"permuted": -0.002, "mean": 0.004}), {})
    verdict = monitor.text_verdict()
    assert verdict.startswith("The text was used (phase 1, epoch 3)") and "+0.0040" in verdict and "-0.0020" in verdict


def test_a_resume_from_an_earlier_checkpoint_counts_every_epoch_once(tmp_path):
    monitor = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    monitor.record(1, 1, metrics(0.50), {"loss": 3.0})
    monitor.record(1, 2, metrics(0.51), {"loss": 2.0})
    # The next invocation resumes from the epoch-1 checkpoint (same run id) and writes epoch 2 again.
    resumed = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    resumed.record(1, 2, metrics(0.55), {"loss": 1.5})
    assert [(r["epoch"], r["AP"]) for r in resumed.records()] == [(1, 0.50), (2, 0.55)]
    resumed.write_report()
    report = (tmp_path / "report.md").read_text()
    assert "| 1 | 2 | 0.5500 |" in report and "0.5100" not in report
    # Resuming from epoch 1 again cuts off epoch 2 of the branch before, even before writing its own epoch 2.
    again = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    again.record(1, 1, metrics(0.49), {"loss": 3.1})
    assert [(r["epoch"], r["AP"]) for r in again.records()] == [(1, 0.49)]
    assert again.phase_summary()[0]["epochs"] == 1


def test_bytes_that_are_not_utf8_are_reported_once_and_skipped(tmp_path, capsys):
    monitor = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    monitor.record(1, 1, metrics(0.50), {})
    with monitor.log_path.open("ab") as log:
        log.write(b"\xff\xfe" + np.random.default_rng(0).bytes(300))
    again = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    again.record(1, 2, metrics(0.52), {})
    assert [r["epoch"] for r in again.records()] == [1, 2]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unreadable record" in line]
    assert len(warnings) == 1 and "metrics.jsonl:2" in warnings[0]
    again.records()
    assert "unreadable record" not in capsys.readouterr().err


def test_a_delta_that_rounds_to_zero_prints_as_plus_zero(tmp_path):
    assert (signed(-0.00001), signed(-0.00001, 3), signed(-0.00006), signed(0.0)) == (
        "+0.0000",
        "+0.000",
        "-0.0001",
        "+0.0000",
    )
    monitor = monitor_with_base(tmp_path, {"w": torch.ones(3)})
    record = monitor.record(1, 1, metrics(0.5 - 1e-6, {"permuted": -1e-6, "mean": -2e-6}), {"images_per_s": 1.0})
    line = format_epoch(record, 1, 0)
    assert "ΔAP +0.0000" in line and "Δperm +0.0000 Δmean +0.0000" in line
    assert "-0.000" not in monitor.summary_table() and "+0.000" in monitor.summary_table()
    assert "+0.0000" in monitor.text_verdict() and "-0.0000" not in monitor.text_verdict()
    monitor.write_report()
    report = (tmp_path / "report.md").read_text()
    assert "-0.0000" not in report and "| a | 0.5000 | 0.5000 | +0.0000 |" in report


def test_the_curves_have_integer_epochs_and_the_loss_and_lr_of_every_epoch():
    records = [
        {"phase": 1, "epoch": 1, "AP": 0.5, "AP50": 0.7, "delta_AP": 0.0, "delta_AP50": 0.0, "train": {"loss": 3.0}},
        {"phase": 1, "epoch": 2, "AP": 0.5, "AP50": 0.7, "train": {"loss": 2.0, "lr": 2e-4}},
    ]
    records[1] |= {"delta_AP": 0.001, "delta_AP50": 0.0}
    figure = curves_figure(records, (0.5, 0.7), 0.05, "title")
    figure.canvas.draw()
    for axis in figure.axes:
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert ticks == [1.0, 2.0]
    _, _, loss, lr = figure.axes
    assert list(loss.get_lines()[0].get_ydata()) == [3.0, 2.0]
    rates = lr.get_lines()[0].get_ydata()
    assert np.isnan(rates[0]) and rates[1] == 2e-4  # the older record has no LR: a gap, not a zero
    plt.close(figure)
    figure = curves_figure(records[:1], (0.5, 0.7), 0.05, "title")
    assert "no learning rate in these records" in [text.get_text() for text in figure.axes[3].texts]
    plt.close(figure)
