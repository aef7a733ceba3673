"""``curves.png``: what fine-tuning did, epoch by epoch, in two panels.

Top: AP and AP50 of every phase against the run's epoch count (1-based, as the log prints it), the base detector as a
line and the phase boundaries marked. Bottom, on its own axis so that changes of 0.001 show: ΔAP and ΔAP50 of the
phases ≥ 1 against the base, with the forgetting guard's ``-max_ap_drop`` line.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt

from multimodal.files import atomic_write


def plot_curves(
    records: list[dict], base: tuple[float, float] | None, max_ap_drop: float, path: Path, run_id: str
) -> None:
    """Write the two-panel figure of ``records`` (one per evaluated epoch, in order) to ``path``; ``base`` is the
    base detector's (AP, AP50)."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2), layout="constrained")
    x = list(range(1, len(records) + 1))
    starts = [i for i in range(len(records)) if i == 0 or records[i]["phase"] != records[i - 1]["phase"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for begin, end in zip(starts, [*starts[1:], len(records)], strict=True):
        phase, span, colour = records[begin]["phase"], x[begin:end], colours[records[begin]["phase"] % len(colours)]
        panels = [(top, "", "AP")] + ([(bottom, "delta_", "ΔAP")] if "delta_AP" in records[begin] else [])
        for axis, prefix, name in panels:  # AP solid, AP50 dotted, one colour per phase
            for metric, style, marker in (("AP", "-", "o"), ("AP50", ":", ".")):
                values = [r[prefix + metric] for r in records[begin:end]]
                label = f"phase {phase} {name}{metric.removeprefix('AP')}"
                axis.plot(span, values, linestyle=style, marker=marker, color=colour, label=label)
        for axis in (top, bottom):
            if begin:
                axis.axvline(begin + 0.5, color="grey", linewidth=0.8)
        middle = (span[0] + span[-1]) / 2
        label = top.annotate(
            f"phase {phase}", (middle, 0.99), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=8
        )
        label.set_in_layout(False)
    if base is not None:
        top.axhline(base[0], color="black", linestyle="--", linewidth=1, label=f"base AP {base[0]:.4f}")
        top.axhline(base[1], color="black", linestyle=":", linewidth=1, label=f"base AP50 {base[1]:.4f}")
    bottom.axhline(0.0, color="black", linestyle="--", linewidth=1)
    deltas = [r[key] for r in records for key in ("delta_AP", "delta_AP50") if key in r] or [0.0]
    low, high = min(*deltas, 0.0), max(*deltas, 0.0)
    pad = max(0.002, 0.15 * (high - low))
    if -max_ap_drop >= low - 3 * pad:  # the guard's line only when the curves come near it: the zoom stays
        bottom.axhline(-max_ap_drop, color="red", linestyle="--", linewidth=0.8, label=f"-max_ap_drop {max_ap_drop:g}")
        low = min(low, -max_ap_drop)
    else:
        bottom.text(
            0.01,
            0.03,
            f"forgetting guard at ΔAP −{max_ap_drop:g}, below the axis",
            transform=bottom.transAxes,
            fontsize=7,
            color="red",
        )
    bottom.set_ylim(low - pad, high + pad)
    top.set_xlim(0.5, len(records) + 0.5)  # room for the last phase's label
    top.set_ylabel("COCO AP")
    bottom.set_ylabel("Δ to the base")
    bottom.set_xlabel("epoch of the run (all phases in order)")
    top.set_title(f"run {run_id} ({path.parent.name}): validation AP per epoch")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best", ncol=2)
    if not any("delta_AP" in r for r in records):
        bottom.text(0.5, 0.5, "no phase ≥ 1 yet", transform=bottom.transAxes, ha="center", va="center")
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)
