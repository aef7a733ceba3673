"""The figure of the held-out-class test: per split, the held-out classes' AP with each kind of class row, and how far
the known classes moved from the base.

    python experiments/plot_held_out.py --output docs/held_out_classes.png \\
        CLIP=runs/held_out/clip/results.json "MiniLM name=runs/held_out/minilm_name/results.json" ...

Each argument is ``LABEL=results.json`` of ``experiments/held_out_classes.py``. The first file also gives the bars
that do not depend on the text (its own rows, random rows) and its permuted and random text; the others add their
real text's bar.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def bars(results: dict[str, dict]) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """(split names, held-out AP per bar, known AP − base per bar), one value per split."""
    first_label, first = next(iter(results.items()))
    splits = list(first)
    columns = {"own rows (oracle)": (first, "oracle"), f"{first_label}": (first, "text")}
    columns |= {f"{label}": (result, "text") for label, result in list(results.items())[1:]}
    columns |= {
        f"{first_label} permuted": (first, "permuted"),
        "random text": (first, "random"),
        "random rows": (first, "random_rows"),
    }
    held, known = {}, {}
    for name, (result, variant) in columns.items():
        if all(variant in result[split]["variants"] for split in splits):
            held[name] = [result[split]["variants"][variant]["held_out_AP"] for split in splits]
            known[name] = [
                result[split]["variants"][variant]["known_AP"] - result[split]["variants"]["oracle"]["known_AP"]
                for split in splits
            ]
    return splits, held, known


def plot(results: dict[str, dict], output: Path) -> None:
    splits, held, known = bars(results)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1.2])
    width = 0.8 / len(held)
    positions = np.arange(len(splits))
    for offset, name in enumerate(held):
        x = positions + (offset - (len(held) - 1) / 2) * width
        top.bar(x, held[name], width, label=name)
        bottom.bar(x, known[name], width, label=name)
    top.set_ylabel("AP of the held-out classes")
    top.set_title("Classes left out of the detector and added back by their text (no training)")
    top.legend(fontsize=8, ncol=2)
    top.grid(axis="y", alpha=0.3)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("known AP − base")
    bottom.set_ylim(-0.005, 0.005)
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(positions, [split.replace("_", " ") for split in splits])
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("results", nargs="+", metavar="LABEL=results.json")
    args = parser.parse_args()
    results = {}
    for item in args.results:
        label, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"{item}: give LABEL=path of an existing results.json")
        results[label] = json.loads(Path(path).read_text())
    plot(results, args.output)
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
