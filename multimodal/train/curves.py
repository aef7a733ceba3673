"""``curves.png``: what fine-tuning did, epoch by epoch, in four panels over one epoch axis (integer ticks).

1. AP and AP50 of every phase against the run's epoch count (1-based, as the log prints it), the base detector as a
   line and the phase boundaries marked.
2. On its own axis so that changes of 0.001 show: ΔAP and ΔAP50 of the phases ≥ 1 against the base, with the
   forgetting guard's ``-max_ap_drop`` line.
3. The mean training loss of every epoch.
4. The learning rate at the end of every epoch (``train["lr"]``; records written before it was logged leave gaps).
"""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from multimodal.files import atomic_write
from multimodal.train.records import EpochRecord


def _train_value(record: EpochRecord, key: str) -> float:
    """A training statistic of the epoch, NaN (a gap in the curve) when the record does not hold it."""
    return float(record.train.get(key, math.nan))


def curves_figure(
    records: list[EpochRecord], base: tuple[float, float] | None, max_ap_drop: float, title: str
) -> Figure:
    """The four panels of ``records`` (one per evaluated epoch, in order); ``base`` is the base detector's
    (AP, AP50)."""
    figure, (top, bottom, loss, lr) = plt.subplots(
        4, 1, figsize=(9, 10), sharex=True, height_ratios=(3, 2, 1.5, 1.5), layout="constrained"
    )
    x = list(range(1, len(records) + 1))
    starts = [i for i in range(len(records)) if i == 0 or records[i].phase != records[i - 1].phase]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for begin, end in zip(starts, [*starts[1:], len(records)], strict=True):
        phase, span, colour = records[begin].phase, x[begin:end], colours[records[begin].phase % len(colours)]
        panels = [(top, "", "AP")] + ([(bottom, "delta_", "ΔAP")] if records[begin].delta_AP is not None else [])
        for axis, prefix, name in panels:  # AP solid, AP50 dotted, one colour per phase
            for metric, style, marker in (("AP", "-", "o"), ("AP50", ":", ".")):
                values = [getattr(r, prefix + metric) for r in records[begin:end]]
                label = f"phase {phase} {name}{metric.removeprefix('AP')}"
                axis.plot(span, values, linestyle=style, marker=marker, color=colour, label=label)
        for axis, key in ((loss, "loss"), (lr, "lr")):
            axis.plot(span, [_train_value(r, key) for r in records[begin:end]], marker="o", color=colour)
        for axis in (top, bottom, loss, lr):
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
    deltas = [value for r in records for value in (r.delta_AP, r.delta_AP50) if value is not None] or [0.0]
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
    rates = [_train_value(r, "lr") for r in records]
    if any(rate > 0 for rate in rates):  # phases differ by 10× in LR: a log axis shows each of them
        lr.set_yscale("log")
    for axis, key, what in ((loss, "loss", "training loss"), (lr, "lr", "learning rate")):
        if not any(math.isfinite(_train_value(r, key)) for r in records):
            axis.text(0.5, 0.5, f"no {what} in these records", transform=axis.transAxes, ha="center", va="center")
    top.set_xlim(0.5, len(records) + 0.5)  # room for the last phase's label
    lr.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5 (the panels share it)
    top.set_ylabel("COCO AP")
    bottom.set_ylabel("Δ to the base")
    loss.set_ylabel("training loss\n(epoch mean)")
    lr.set_ylabel("LR at the\nepoch's end")
    lr.set_xlabel("epoch of the run (all phases in order)")
    top.set_title(title)
    for axis in (top, bottom, loss, lr):
        axis.grid(alpha=0.3)
    for axis in (top, bottom):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best", ncol=2)
    if not any(r.delta_AP is not None for r in records):
        bottom.text(0.5, 0.5, "no phase ≥ 1 yet", transform=bottom.transAxes, ha="center", va="center")
    return figure


def plot_curves(
    records: list[EpochRecord], base: tuple[float, float] | None, max_ap_drop: float, path: Path, run_id: str
) -> None:
    """Write ``curves_figure`` of ``records`` to ``path``."""
    figure = curves_figure(records, base, max_ap_drop, f"run {run_id} ({path.parent.name}): validation AP per epoch")
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)
