"""experiments/compare_runs.py: deltas, forgetting and per-class tables from the files a training run writes."""

import importlib.util
import json
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compare_runs", PROJECT_DIR / "experiments" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_run(directory: Path, base_ap: float, aps: list[float]) -> Path:
    directory.mkdir()
    per_class = {"crack": {"AP": base_ap, "AP50": 0.5}}
    (directory / "baseline.json").write_text(json.dumps({"AP": base_ap, "AP50": 0.5, "per_class": per_class}))
    records = [{"phase": 0, "epoch": 0, "AP": 0.0, "AP50": 0.0, "per_class": per_class, "train": {}}]
    for epoch, ap in enumerate(aps):
        record = {"phase": 1, "epoch": epoch, "AP": ap, "AP50": ap + 0.2, "per_class": {"crack": {"AP": ap}}}
        records.append(record | {"train": {"seconds": 10.0}})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return directory


def test_summary_reports_final_delta_largest_drop_and_time(tmp_path, capsys):
    progressive = write_run(tmp_path / "progressive", 0.40, [0.41, 0.38, 0.42])
    joint = write_run(tmp_path / "joint", 0.40, [0.30, 0.33])
    plot = tmp_path / "runs.png"
    arguments = ["--run", f"progressive={progressive}", "--run", f"joint={joint}", "--plot", str(plot)]
    assert compare_runs.main(arguments) == 0
    lines = capsys.readouterr().out.splitlines()
    progressive_row = next(line for line in lines if line.startswith("| progressive"))
    joint_row = next(line for line in lines if line.startswith("| joint"))
    # epochs, base, final, ΔAP, final AP50, ΔAP50, largest drop, time (phase-0 records are not fine-tuning epochs)
    assert progressive_row.split("|")[2:10] == [
        " 3 ",
        " 0.4000 ",
        " 0.4200 ",
        " +0.0200 ",
        " 0.6200 ",
        " +0.1200 ",
        " 0.0200 ",
        " 30 s ",
    ]
    assert " -0.0700 " in joint_row and " 0.1000 " in joint_row  # final 0.33, worst 0.30
    assert "| crack | 0.4000 | 0.4200 | 0.3300 |" in lines
    assert plot.stat().st_size > 1000
