"""The reports of a run: the current run's records only, the text verdict, signed figures that never print -0.0000,
the log lines, summary.json and the curves."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from deim_lib.evaluate import METRIC_NAMES
from multimodal.train.curves import curves_figure
from multimodal.train.records import Baseline, EpochRecord, TextFigures, epoch_record
from multimodal.train.report import (
    format_epoch,
    format_evaluation,
    phase_summary,
    signed,
    summary_table,
    text_verdict,
    write_report,
    write_summary,
)

BASELINE = Baseline(0.5, 0.7, {"a": {"AP": 0.5, "AP50": 0.7}}, "measured", "base", "val")


def reliance(permuted: float, mean: float) -> dict:
    return {"AP_permuted": 0.5 - permuted, "permuted": permuted, "AP_mean": 0.5 - mean, "mean": mean}


def record(epoch: int, ap: float, figures: dict | None = None, phase: int = 1, run_id: str = "r1") -> EpochRecord:
    text = {"added_signal": [0.01, 0.02], "classifier_bias": None} | ({"reliance": figures} if figures else {})
    metrics = {"AP": ap, "AP50": ap + 0.2, "per_class": {"a": {"AP": ap, "AP50": ap + 0.2}}, "text": text}
    return epoch_record(run_id, phase, epoch, metrics, {"loss": 1.0, "images_per_s": 2.5}, BASELINE)


def test_the_report_shows_the_records_it_is_given(tmp_path):
    records = [record(1, 0.52, reliance(0.0, 0.01), run_id="new")]
    write_report(tmp_path, records, BASELINE, "new", 0.05, ["Text embeddings: cached."])
    report = (tmp_path / "report.md").read_text()
    assert "Run new" in report and "| 1 | 1 | 0.5200 |" in report and "Text embeddings: cached." in report
    assert "| 1 | 1 | 0.5200 | 0.7200 | +0.0200 | 0.0100, 0.0200 | +0.0000 | +0.0100 |" in report
    assert "Added signal:" in report and "The text was used" in report
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_the_verdict_says_plainly_whether_the_text_was_used():
    assert text_verdict([record(1, 0.5)]) == "Text reliance was not measured (monitor.text_reliance: never)."
    records = [record(1, 0.5, reliance(0.0, 0.0))]
    assert text_verdict(records).startswith("The text was not used (phase 1, epoch 1)")
    records.append(record(2, 0.5, reliance(0.0, 0.0002)))
    assert text_verdict(records).startswith("The text was barely used (phase 1, epoch 2)")
    records.append(record(3, 0.5, reliance(-0.002, 0.004)))
    records.append(record(4, 0.5))  # not measured: the last measured epoch speaks
    verdict = text_verdict(records)
    assert verdict.startswith("The text was used (phase 1, epoch 3)") and "+0.0040" in verdict and "-0.0020" in verdict


def test_the_phase_summary_has_the_last_epoch_and_the_worst_drop():
    records = [record(1, 0.48), record(2, 0.51, reliance(0.01, 0.02)), record(1, 0.4, phase=0)]
    records = sorted(records, key=lambda r: r.phase)
    phase0, phase1 = phase_summary(records, BASELINE)
    assert phase0 == {"phase": 0, "worst_AP": 0.4, "AP": 0.4, "AP50": pytest.approx(0.6), "epochs": 1}
    assert phase1["epochs"] == 2 and phase1["AP"] == 0.51 and phase1["reliance"] == reliance(0.01, 0.02)
    assert phase1["delta_AP"] == pytest.approx(0.01) and phase1["max_drop"] == pytest.approx(0.02)
    assert "delta_AP" not in phase_summary(records, None)[1]
    table = summary_table(records, BASELINE).splitlines()
    assert table[1] == "base         0.500   0.700" and table[2].startswith("phase 0      0.400   0.600")
    assert table[3] == "phase 1      0.510   0.710  +0.010     0.020   +0.010   +0.020"


def test_a_delta_that_rounds_to_zero_prints_as_plus_zero(tmp_path):
    assert (signed(-0.00001), signed(-0.00001, 3), signed(-0.00006), signed(0.0)) == (
        "+0.0000",
        "+0.000",
        "-0.0001",
        "+0.0000",
    )
    records = [record(1, 0.5 - 1e-6, reliance(-1e-6, -2e-6))]
    line = format_epoch(records[0], 1, 0)
    assert "ΔAP +0.0000" in line and "Δperm +0.0000 Δmean +0.0000" in line
    assert "-0.000" not in summary_table(records, BASELINE) and "+0.000" in summary_table(records, BASELINE)
    assert "+0.0000" in text_verdict(records) and "-0.0000" not in text_verdict(records)
    write_report(tmp_path, records, BASELINE, "r1", 0.05)
    report = (tmp_path / "report.md").read_text()
    assert "-0.0000" not in report and "| a | 0.5000 | 0.5000 | +0.0000 |" in report


def test_the_epoch_line_has_the_figures_the_record_holds():
    line = format_epoch(record(2, 0.52, reliance(0.01, -0.02)), 3, nonfinite_steps=2)
    assert line == (
        "phase 1 epoch 2/3: loss 1.0000  AP 0.5200  AP50 0.7200  ΔAP +0.0200  added signal [0.01, 0.02]  "
        "text reliance: Δperm +0.0100 Δmean -0.0200  2.5 img/s  non-finite steps 2"
    )
    without_text = EpochRecord("r1", 0, 1, 0.3, 0.4, {}, TextFigures(), {"images_per_s": 1.0})
    assert format_epoch(without_text, 1, 0) == "phase 0 epoch 1/1: loss nan  AP 0.3000  AP50 0.4000  1.0 img/s"


def test_the_evaluation_table_has_the_text_figures_when_there_are_any():
    metrics = dict.fromkeys(METRIC_NAMES, 0.5) | {"per_class": {"a": {"AP": 0.5, "AP50": 0.7}}, "text": {}}
    assert "added signal" not in format_evaluation(metrics, per_class=False)
    assert "class" in format_evaluation(metrics, per_class=True)
    metrics["text"] = {"added_signal": [0.01, 0.02], "classifier_bias": None, "reliance": reliance(-1e-6, 0.01)}
    lines = format_evaluation(metrics, per_class=False).splitlines()
    assert lines[-2:] == [
        "added signal per fusion level (fine → coarse): 0.0100, 0.0200",
        "AP(real) − AP(permuted) +0.0000, AP(real) − AP(mean) +0.0100",
    ]


def test_the_summary_holds_the_table_the_verdict_and_the_machine(tmp_path):
    records = [record(1, 0.52, reliance(0.0, 0.01))]
    shown = write_summary(tmp_path, records, BASELINE, ["r0", "r1"], torch.device("cpu"), 12.34, ["train.py"])
    assert shown == summary_table(records, BASELINE) + "\n" + text_verdict(records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["run_id", "lineage", "command", "baseline", "phases", "text", "machine", "wall_seconds"]
    assert summary["run_id"] == "r1" and summary["baseline"] == {"AP": 0.5, "AP50": 0.7}
    assert summary["phases"] == phase_summary(records, BASELINE) and summary["text"] == text_verdict(records)
    assert summary["machine"]["torch"] == torch.__version__ and summary["wall_seconds"] == 12.3


def test_the_curves_have_integer_epochs_and_the_loss_and_lr_of_every_epoch():
    records = [
        EpochRecord("r1", 1, 1, 0.5, 0.7, {}, TextFigures(), {"loss": 3.0}, 0.0, 0.0, {}),
        EpochRecord("r1", 1, 2, 0.5, 0.7, {}, TextFigures(), {"loss": 2.0, "lr": 2e-4}, 0.001, 0.0, {}),
    ]
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
