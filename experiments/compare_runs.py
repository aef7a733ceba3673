"""Compare fine-tuning runs of train_progressive.py: AP against the base, the worst forgetting, per-class extremes and
time over seeds, and WiSE-FT curves; prints markdown.

    python experiments/compare_runs.py --run progressive=runs/a_s0,runs/a_s1 --run joint=runs/b_s0,runs/b_s1 \
        --plot docs/runs.png --json docs/runs.json [--wise-ft runs/w_s0,runs/w_s1]

A run is one or more output directories (one per seed), each holding the ``baseline.json``, ``metrics.jsonl`` and
``summary.json`` the training script writes. Values over seeds are "mean ± standard deviation". "best AP" is the
highest validation AP of the run: what keeping the best checkpoint would give, chosen on the images that score it.
"""

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_run(directory: Path) -> dict:
    """One seed: its baseline and its fine-tuning records (phase ≥ 1), each with the step counted over all phases.

    Only the records of the chain the last finished invocation belongs to count (``summary.json``'s lineage): an
    interrupted earlier attempt in the same directory is left out.
    """
    for name in ("baseline.json", "metrics.jsonl", "summary.json"):
        if not (directory / name).is_file():
            raise SystemExit(f"{directory}: no {name}; the run has not finished (or is not a train_progressive.py run)")
    baseline = json.loads((directory / "baseline.json").read_text())
    lineage = json.loads((directory / "summary.json").read_text())["lineage"]
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [record for record in records if record["phase"] >= 1 and record.get("run_id") in lineage]
    offset, last_phase, previous_step = 0, None, 0
    for record in records:
        if record["phase"] != last_phase:
            offset, last_phase = offset + previous_step, record["phase"]
        previous_step = record["train"].get("step", record["epoch"])
        record["run_step"] = offset + previous_step
    return {"baseline": baseline, "records": records}


def seed_figures(seed: dict) -> dict:
    base, records = seed["baseline"], seed["records"]
    final = records[-1]
    deltas = {
        name: values["AP"] - base["per_class"][name]["AP"]
        for name, values in final["per_class"].items()
        if base["per_class"][name]["AP"] >= 0 and values["AP"] >= 0
    }
    worst, best = min(deltas, key=deltas.get), max(deltas, key=deltas.get)
    return {
        "base_AP": base["AP"],
        "final_AP": final["AP"],
        "best_AP": max(r["AP"] for r in records),
        "lowest_AP": min(r["AP"] for r in records),
        "delta_AP": final["AP"] - base["AP"],
        "final_AP50": final["AP50"],
        "delta_AP50": final["AP50"] - base["AP50"],
        "worst_class": (worst, deltas[worst]),
        "best_class": (best, deltas[best]),
        "seconds": sum(r["train"].get("epoch_seconds", r["train"].get("seconds", 0.0)) for r in records),
        "epochs": len(records),
    }


def _spread(values: list[float], digits: int = 4, sign: bool = False) -> str:
    mean = statistics.fmean(values)
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if len(values) < 2 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def summary_rows(figures_by_run: dict[str, list[dict]]) -> list[str]:
    """One markdown row per run from its seeds' ``seed_figures``."""
    lines = [
        "| run | seeds | epochs | base AP | final AP | best AP | lowest AP | ΔAP | final AP50 | ΔAP50 | "
        "lowest class ΔAP | highest class ΔAP | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, figures in figures_by_run.items():
        column = {key: [f[key] for f in figures] for key in figures[0]}
        worst = min(column["worst_class"], key=lambda item: item[1])
        best = max(column["best_class"], key=lambda item: item[1])
        lines.append(
            f"| {name} | {len(figures)} | {figures[0]['epochs']} | {_spread(column['base_AP'])} "
            f"| {_spread(column['final_AP'])} | {_spread(column['best_AP'])} | {_spread(column['lowest_AP'])} "
            f"| {_spread(column['delta_AP'], sign=True)} "
            f"| {_spread(column['final_AP50'])} | {_spread(column['delta_AP50'], sign=True)} "
            f"| {worst[0]} {worst[1]:+.3f} | {best[0]} {best[1]:+.3f} | {_spread(column['seconds'], 0)} s |"
        )
    return lines


def wise_ft_rows(curves: list[dict]) -> list[str]:
    weights = [point["weight"] for point in curves[0]["points"]]
    lines = ["| mixing weight | " + " | ".join(f"{w:g}" for w in weights) + " |"]
    lines.append("|---|" + "---|" * len(weights))
    for metric in ("AP", "AP50"):
        cells = [_spread([curve["points"][i][metric] for curve in curves]) for i in range(len(weights))]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """AP against the step of every run on one axis (one line per seed), zoomed around the base, the base a line."""
    figure, axis = plt.subplots(figsize=(10, 5.5), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = []
    for colour, (name, seeds) in zip(colours * 3, runs.items(), strict=False):
        for number, seed in enumerate(seeds):
            steps, aps = [r["run_step"] for r in seed["records"]], [r["AP"] for r in seed["records"]]
            axis.plot(steps, aps, color=colour, alpha=0.8, linewidth=1.2, label=name if number == 0 else None)
            values += aps
    base = next(iter(runs.values()))[0]["baseline"]["AP"]
    axis.axhline(base, color="black", linestyle="--", linewidth=1.2, label=f"base detector {base:.4f}")
    spread = max(abs(value - base) for value in values)
    axis.set_ylim(base - 1.15 * spread, base + 1.15 * spread)
    axis.set_xlabel("training step (all phases of a run in order)")
    axis.set_ylabel("COCO AP, validation (EMA weights)")
    axis.set_title("Fine-tuning the real DEIMv2-Atto: AP per epoch, every seed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR[,DIR...]")
    parser.add_argument("--wise-ft", metavar="DIR[,DIR...]", help="interpolation outputs (curve.json) to tabulate")
    parser.add_argument("--plot", type=Path, help="write the AP-per-step figure here")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, directories = spec.partition("=")
        runs[name] = [read_run(Path(directory)) for directory in directories.split(",")]
    record = {name: [seed_figures(seed) for seed in seeds] for name, seeds in runs.items()}
    print("\n".join(summary_rows(record)))
    if args.wise_ft:
        curves = [json.loads((Path(d) / "curve.json").read_text()) for d in args.wise_ft.split(",")]
        print("\nWiSE-FT (AP of each mix on the validation set):\n\n" + "\n".join(wise_ft_rows(curves)))
        record["wise_ft"] = curves
    if args.plot:
        plot(runs, args.plot)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
