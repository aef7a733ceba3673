"""Compare fine-tuning runs of train_progressive.py: AP per epoch against the base, forgetting, per-class AP, time.

    python experiments/compare_runs.py --run progressive=runs/neu_det/progressive \
        --run joint_2e-5=runs/neu_det/joint_2e-5 --plot docs/neu_det_runs.png > runs/neu_det/summary.md

Each run directory holds the ``baseline.json`` and ``metrics.jsonl`` the training script writes. Prints markdown.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_run(directory: Path) -> tuple[dict, list[dict]]:
    baseline = json.loads((directory / "baseline.json").read_text())
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return baseline, [record for record in records if record["phase"] >= 1]


def summary_rows(runs: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    lines = ["| run | epochs | base AP | final AP | ΔAP | final AP50 | ΔAP50 | largest drop below base | train time |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, (baseline, records) in runs.items():
        final = records[-1]
        drop = max(0.0, baseline["AP"] - min(r["AP"] for r in records))
        seconds = sum(r["train"].get("seconds", 0.0) for r in records)
        delta, delta50 = final["AP"] - baseline["AP"], final["AP50"] - baseline["AP50"]
        lines.append(
            f"| {name} | {len(records)} | {baseline['AP']:.4f} | {final['AP']:.4f} | {delta:+.4f} "
            f"| {final['AP50']:.4f} | {delta50:+.4f} | {drop:.4f} | {seconds:.0f} s |"
        )
    return lines


def per_class_rows(runs: dict[str, tuple[dict, list[dict]]]) -> list[str]:
    baseline = next(iter(runs.values()))[0]
    names = list(baseline["per_class"])
    lines = ["| class | base AP | " + " | ".join(f"{run} AP" for run in runs) + " |"]
    lines.append("|---|---|" + "---|" * len(runs))
    for name in names:
        cells = [f"{records[-1]['per_class'][name]['AP']:.4f}" for _, records in runs.values()]
        lines.append(f"| {name} | {baseline['per_class'][name]['AP']:.4f} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: dict[str, tuple[dict, list[dict]]], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("AP", "AP50"), strict=True):
        for name, (_, records) in runs.items():
            axis.plot(range(1, len(records) + 1), [r[metric] for r in records], marker="o", label=name)
        axis.axhline(next(iter(runs.values()))[0][metric], color="black", linestyle="--", label="base detector")
        axis.set_xlabel("fine-tuning epoch")
        axis.set_ylabel(f"COCO {metric} (validation)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--plot", type=Path, help="write the AP-per-epoch figure here")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, directory = spec.partition("=")
        runs[name] = read_run(Path(directory))
    print("\n".join(summary_rows(runs)) + "\n\n" + "\n".join(per_class_rows(runs)))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
