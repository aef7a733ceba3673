"""experiments/compare_runs.py: deltas, the worst forgetting, per-class extremes and time over seeds."""

import importlib.util
import json
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compare_runs", PROJECT_DIR / "experiments" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_run(directory: Path, base_ap: float, aps: list[float], phases: list[int] | None = None) -> Path:
    directory.mkdir()
    per_class = {"crack": {"AP": base_ap, "AP50": 0.5}, "pit": {"AP": base_ap, "AP50": 0.5}}
    (directory / "baseline.json").write_text(json.dumps({"AP": base_ap, "AP50": 0.5, "per_class": per_class}))
    records = [{"phase": 0, "epoch": 1, "AP": 0.0, "AP50": 0.0, "per_class": per_class, "train": {}}]
    phases = phases or [1] * len(aps)
    for epoch, (ap, phase) in enumerate(zip(aps, phases, strict=True), start=1):
        classes = {"crack": {"AP": ap}, "pit": {"AP": base_ap + 0.01}}
        train = {"epoch_seconds": 10.0, "step": 5 * sum(p == phase for p in phases[:epoch])}
        records.append(
            {"phase": phase, "epoch": epoch, "AP": ap, "AP50": ap + 0.2, "per_class": classes} | {"train": train}
        )
    interrupted = {"run_id": "killed", "phase": 1, "epoch": 1, "AP": 0.0, "AP50": 0.0, "per_class": {}, "train": {}}
    lines = [json.dumps(r | {"run_id": "r0"}) for r in records] + [json.dumps(interrupted)]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "summary.json").write_text(json.dumps({"lineage": ["r0"]}))
    return directory


def test_summary_reports_final_delta_the_worst_drop_class_extremes_and_time(tmp_path, capsys):
    progressive = write_run(tmp_path / "progressive", 0.40, [0.43, 0.38, 0.42], phases=[1, 2, 2])
    seeds = [write_run(tmp_path / f"joint_s{seed}", 0.40, aps) for seed, aps in enumerate([[0.30, 0.33], [0.34, 0.35]])]
    plot, record = tmp_path / "runs.png", tmp_path / "runs.json"
    arguments = ["--run", f"progressive={progressive}", "--run", "joint=" + ",".join(map(str, seeds))]
    assert compare_runs.main([*arguments, "--plot", str(plot), "--json", str(record)]) == 0
    lines = capsys.readouterr().out.splitlines()
    progressive_row = next(line for line in lines if line.startswith("| progressive"))
    joint_row = next(line for line in lines if line.startswith("| joint"))
    # seeds, epochs, base, final, best, lowest, ΔAP, final AP50, ΔAP50, class drop, class gain, time (no phase 0)
    assert [cell.strip() for cell in progressive_row.split("|")[2:14]] == [
        "1", "3", "0.4000", "0.4200", "0.4300", "0.3800", "+0.0200", "0.6200", "+0.1200", "pit +0.010",
        "crack +0.020", "30 s",
    ]  # fmt: skip
    cells = [cell.strip() for cell in joint_row.split("|")[2:10]]
    assert cells[:2] == ["2", "2"] and cells[3] == "0.3400 ± 0.0141" and cells[4] == "0.3400 ± 0.0141"
    assert cells[6] == "-0.0600 ± 0.0141"
    assert plot.stat().st_size > 1000
    steps = [r["run_step"] for r in compare_runs.read_run(progressive)["records"]]
    assert steps == [5, 10, 15]  # phase 2 counts on from phase 1's last step
    assert json.loads(record.read_text())["joint"][1]["final_AP"] == 0.35


def test_an_unfinished_run_is_one_line_naming_the_directory(tmp_path):
    run = write_run(tmp_path / "killed", 0.40, [0.41])
    (run / "summary.json").unlink()
    with pytest.raises(SystemExit, match=f"{run}: no summary.json; the run has not finished"):
        compare_runs.main(["--run", f"killed={run}"])
