"""Compare fine-tuning runs of train_progressive.py: AP against the base, the worst forgetting, per-class extremes and
time over seeds, and WiSE-FT curves; prints markdown.

    python experiments/compare_runs.py --run progressive=runs/a_s0,runs/a_s1 --run joint=runs/b_s0,runs/b_s1 \
        --plot docs/runs.png --json docs/runs.json [--wise-ft runs/w_s0,runs/w_s1]

A run is one or more output directories (one per seed), each holding the ``baseline.json``, ``metrics.jsonl`` and
``summary.json`` the training script writes. Values over seeds are "mean ± standard deviation". "best AP" is the
highest validation AP of the run: what keeping the best checkpoint would give, chosen on the images that score it.
Also printed: every class's final AP minus its base AP, per run. ``experiments/evidence.py`` runs the whole grid
and builds its report from these functions.
"""

import argparse
import itertools
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
        "class_deltas": deltas,
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


def class_delta_rows(figures_by_run: dict[str, list[dict]]) -> list[str]:
    """One markdown row per class: its final AP minus its base AP in every run (over seeds), classes in the order of
    the validation set. A class without validation boxes has no AP and is left out."""
    runs = list(figures_by_run)
    classes = list(dict.fromkeys(name for figures in figures_by_run.values() for name in figures[0]["class_deltas"]))
    lines = ["| class | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for name in classes:
        cells = []
        for run in runs:
            values = [
                figures["class_deltas"][name] for figures in figures_by_run[run] if name in figures["class_deltas"]
            ]
            cells.append(_spread(values, 3, sign=True) if values else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ap_per_step(seeds: list[dict]) -> tuple[list[int], list[list[float]]]:
    """The steps of a run and the AP of every seed at each (step 0: the base detector, where every run starts)."""
    by_step: dict[int, list[float]] = {}
    for seed in seeds:
        by_step.setdefault(0, []).append(seed["baseline"]["AP"])
        for record in seed["records"]:
            by_step.setdefault(record["run_step"], []).append(record["AP"])
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def phase_starts(records: list[dict]) -> list[tuple[int, int]]:
    """(step, phase) where a later phase of the run begins: after the last step of the phase before it."""
    return [
        (before["run_step"], after["phase"])
        for before, after in itertools.pairwise(records)
        if after["phase"] != before["phase"]
    ]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """AP against the step of every run on one axis: the mean over seeds as a line, the seeds' min–max as a band,
    the start of every later phase a dotted line in the run's colour, the base a dashed black line; zoomed around
    the base."""
    figure, axis = plt.subplots(figsize=(10, 5.5), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = []
    for colour, (name, seeds) in zip(colours * 3, runs.items(), strict=False):
        steps, aps = ap_per_step(seeds)
        axis.plot(steps, [statistics.fmean(at) for at in aps], color=colour, linewidth=1.5, label=name)
        axis.fill_between(steps, [min(at) for at in aps], [max(at) for at in aps], color=colour, alpha=0.15)
        for step, phase in phase_starts(seeds[0]["records"]):
            axis.axvline(step, color=colour, linestyle=":", linewidth=1)
            axis.text(
                step, 0.99, f" phase {phase}", color=colour, fontsize=8, va="top", transform=axis.get_xaxis_transform()
            )
        values += [value for at in aps for value in at]
    base = next(iter(runs.values()))[0]["baseline"]["AP"]
    axis.axhline(base, color="black", linestyle="--", linewidth=1.2, label=f"base detector {base:.4f}")
    spread = max(abs(value - base) for value in values) or 0.01
    axis.set_ylim(base - 1.15 * spread, base + 1.15 * spread)
    axis.set_xlabel("training step (all phases of a run in order)")
    axis.set_ylabel("COCO AP, validation (EMA weights)")
    seeds = max(len(seeds) for seeds in runs.values())
    axis.set_title(f"AP per epoch: mean over {seeds} seed{'s' if seeds > 1 else ''} (line), min–max (band)")
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
    print("\nPer class, final AP − base AP:\n\n" + "\n".join(class_delta_rows(record)))
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
