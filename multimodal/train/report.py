"""What a run reports, from its epoch records: the log lines, ``report.md`` with ``curves.png`` and ``summary.json``.

``report.md`` and ``curves.png`` are rewritten at the end of every phase from the records of the current run only (the
phases its checkpoint descends from), never from an earlier run in the same directory; ``summary.json`` at the end of
the run.
"""

import json
import os
import platform
import re
from pathlib import Path

import torch

from deim_lib.evaluate import format_table
from multimodal.files import atomic_write_text
from multimodal.phase_table import PHASES
from multimodal.train.records import Baseline, EpochRecord

SIGNAL_NOTE = (
    "Added signal: ‖fusion output − input‖ / ‖input‖ per feature level (fine → coarse) on the validation images; "
    "0 means the fusion passes the detector's features through unchanged, 0.1 that it adds a tenth of their size."
)
RELIANCE_NOTE = (
    "Text reliance: AP(real) − AP(permuted) is how much AP depends on which description belongs to which class; "
    "AP(real) − AP(mean) on the descriptions' content at all (every class given the mean embedding). Exactly 0: the "
    "text path is unused, whatever the weights say."
)

NEGLIGIBLE_AP = 0.001  # below this a text-reliance figure is within the noise of evaluating another seed


def signed(value: float, decimals: int = 4) -> str:
    """``value`` with its sign, to ``decimals`` places; one that rounds to zero is +0.0000, never -0.0000."""
    return f"{round(value, decimals) + 0.0:+.{decimals}f}"  # round() as the format does; + 0.0 turns -0.0 into 0.0


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    match = re.search(r"^model name\s*: (.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    return f"{match.group(1) if match else platform.machine()} ({torch.get_num_threads()} threads)"


def machine(device: torch.device) -> dict:
    """What a recorded figure depends on: device, cores, Python and torch versions."""
    return {
        "device": device_name(device),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def phase_summary(records: list[EpochRecord], baseline: Baseline | None) -> list[dict]:
    """Per phase: the last epoch's AP/AP50, the lowest AP seen during it and the last text-reliance figures."""
    rows: dict[int, dict] = {}
    for record in records:
        row = rows.setdefault(record.phase, {"phase": record.phase, "worst_AP": record.AP})
        row.update(AP=record.AP, AP50=record.AP50, epochs=record.epoch)
        row["worst_AP"] = min(row["worst_AP"], record.AP)
        if record.text.reliance is not None:
            row["reliance"] = record.text.reliance.to_dict()
    for row in rows.values():
        if baseline is not None and PHASES[row["phase"]].compares_to_base:
            row["delta_AP"] = row["AP"] - baseline.AP
            row["max_drop"] = max(0.0, baseline.AP - row["worst_AP"])
    return [rows[phase] for phase in sorted(rows)]


def summary_table(records: list[EpochRecord], baseline: Baseline | None) -> str:
    """Plain-text per-phase table: base AP, AP after each phase, Δ to the base, worst drop, text reliance."""
    header = f"{'stage':<10}{'AP':>8}{'AP50':>8}{'ΔAP':>8}{'max drop':>10}{'Δ perm':>9}{'Δ mean':>9}"
    lines = [header]
    if baseline is not None:
        lines.append(f"{'base':<10}{baseline.AP:>8.3f}{baseline.AP50:>8.3f}")
    for row in phase_summary(records, baseline):
        delta = signed(row["delta_AP"], 3) if "delta_AP" in row else ""
        drop = f"{row['max_drop']:.3f}" if "max_drop" in row else ""
        reliance = row.get("reliance", {})
        permuted, mean = (signed(reliance[key], 3) if key in reliance else "" for key in ("permuted", "mean"))
        lines.append(
            f"{'phase ' + str(row['phase']):<10}{row['AP']:>8.3f}{row['AP50']:>8.3f}{delta:>8}{drop:>10}"
            f"{permuted:>9}{mean:>9}"
        )
    return "\n".join(lines)


def text_verdict(records: list[EpochRecord]) -> str:
    """One plain sentence: was the text used, by the last text-reliance figures of ``records``?"""
    measured = [record for record in records if record.text.reliance is not None]
    if not measured:
        return "Text reliance was not measured (monitor.text_reliance: never)."
    record = measured[-1]
    reliance, where = record.text.reliance, f"phase {record.phase}, epoch {record.epoch}"
    figures = (
        f"AP(real) − AP(mean description) = {signed(reliance.mean)}, AP(real) − AP(descriptions permuted "
        f"across classes) = {signed(reliance.permuted)}"
    )
    if reliance.permuted == 0 and reliance.mean == 0:
        return f"The text was not used ({where}): {figures}, exactly."
    if max(abs(reliance.permuted), abs(reliance.mean)) < NEGLIGIBLE_AP:
        return f"The text was barely used ({where}): {figures}; under {NEGLIGIBLE_AP} AP either way."
    return f"The text was used ({where}): {figures}; positive means the text helps."


def write_summary(
    output_dir: Path,
    records: list[EpochRecord],
    baseline: Baseline | None,
    lineage: list[str],
    device: torch.device,
    seconds: float,
    command: list[str],
) -> str:
    """``summary.json`` of the run of ``lineage``: its per-phase table, the text verdict, the machine
    and the time. Returns what the log shows of it: the table and the verdict."""
    verdict = text_verdict(records)
    summary = {
        "run_id": lineage[-1],
        "lineage": lineage,
        "command": command,
        "baseline": {"AP": baseline.AP, "AP50": baseline.AP50} if baseline else None,
        "phases": phase_summary(records, baseline),
        "text": verdict,
        "machine": machine(device),
        "wall_seconds": round(seconds, 1),
    }
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return f"{summary_table(records, baseline)}\n{verdict}"


def write_report(
    output_dir: Path,
    records: list[EpochRecord],
    baseline: Baseline | None,
    run_id: str,
    max_ap_drop: float,
    notes: list[str] = (),
) -> None:
    """``report.md`` (per-phase and per-epoch tables, per-class deltas) and ``curves.png`` of the run ``run_id``."""
    from multimodal.train.curves import plot_curves  # matplotlib loads only when a report is written

    lines = ["# Progressive fine-tuning report", "", f"Run {run_id} in `{output_dir}`.", ""]
    lines += [*notes, "", "## Per phase", "", "```", summary_table(records, baseline), "```", ""]
    lines += [text_verdict(records), "", SIGNAL_NOTE, "", RELIANCE_NOTE, "", "## Per epoch", ""]
    lines += [
        "| phase | epoch | AP | AP50 | ΔAP | added signal | Δ perm | Δ mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        delta = signed(r.delta_AP) if r.delta_AP is not None else ""
        signal = ", ".join(f"{value:.4f}" for value in r.text.added_signal or [])
        reliance = r.text.reliance
        permuted, mean = (signed(reliance.permuted), signed(reliance.mean)) if reliance is not None else ("", "")
        lines.append(
            f"| {r.phase} | {r.epoch} | {r.AP:.4f} | {r.AP50:.4f} | {delta} | {signal} | {permuted} | {mean} |"
        )
    if records and records[-1].delta_per_class is not None:
        last = records[-1]
        lines += ["", f"## Per-class AP, last epoch (phase {last.phase}) vs base", ""]
        lines += ["| class | base AP | AP | Δ |", "|---|---|---|---|"]
        for name, delta in last.delta_per_class.items():
            lines.append(
                f"| {name} | {baseline.per_class[name]['AP']:.4f} | {last.per_class[name]['AP']:.4f} "
                f"| {signed(delta)} |"
            )
    atomic_write_text(output_dir / "report.md", "\n".join(lines) + "\n")
    base = (baseline.AP, baseline.AP50) if baseline is not None else None
    plot_curves(records, base, max_ap_drop, output_dir / "curves.png", run_id)


def format_epoch(record: EpochRecord, epochs: int, nonfinite_steps: int) -> str:
    """The log line of one epoch's record."""
    line = f"phase {record.phase} epoch {record.epoch}/{epochs}: loss {record.train.get('loss', float('nan')):.4f}"
    line += f"  AP {record.AP:.4f}  AP50 {record.AP50:.4f}"
    if record.delta_AP is not None:
        line += f"  ΔAP {signed(record.delta_AP)}"
    text = record.text
    if text.added_signal is not None:
        line += f"  added signal {[round(value, 4) for value in text.added_signal]}"
    if text.reliance is not None:
        line += f"  text reliance: Δperm {signed(text.reliance.permuted)} Δmean {signed(text.reliance.mean)}"
    line += f"  {record.train['images_per_s']:.1f} img/s"
    return line + (f"  non-finite steps {nonfinite_steps}" if nonfinite_steps else "")


def format_evaluation(metrics: dict, per_class: bool) -> str:
    """``--eval-only``'s table: COCO's summary metrics, the per-class AP when asked, and the text figures."""
    lines = [format_table(metrics, per_class)]
    text = metrics["text"]
    if text:
        lines.append(
            "added signal per fusion level (fine → coarse): " + ", ".join(f"{r:.4f}" for r in text["added_signal"])
        )
    if "reliance" in text:
        reliance = text["reliance"]
        lines.append(
            f"AP(real) − AP(permuted) {signed(reliance['permuted'])}, AP(real) − AP(mean) {signed(reliance['mean'])}"
        )
    return "\n".join(lines)
