"""The forgetting monitor: the base detector's accuracy as a baseline, every epoch against it, and the reports.

Files in the output directory, which belongs to one base detector and one validation set:
- ``baseline.json``: AP, AP50 and per-class AP of the base detector, with fingerprints of its weights and of the
  validation annotations; a run from another base or on another validation set is refused.
- ``metrics.jsonl``: one record per evaluated epoch of any phase, each with its ``run_id``; a line that is not a
  JSON record (a run killed mid-write, bytes that are not UTF-8) is reported and skipped. A resume from an earlier
  checkpoint writes its epochs again: the latest record of an epoch wins, and the epochs after it that the resume
  cut off no longer count.
- ``report.md`` and ``curves.png``: rewritten at the end of every phase from the records of the current run only (the
  phases its checkpoint descends from), never from an earlier run in the same directory.
"""

import hashlib
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deim_lib.errors import CheckpointError, UserError
from multimodal.files import atomic_write_text
from multimodal.phase_table import PHASES
from multimodal.train.checkpoint import read_phase_checkpoint

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


class MonitorError(UserError):
    """The output directory's records belong to another base detector or validation set, or are unreadable."""


def signed(value: float, decimals: int = 4) -> str:
    """``value`` with its sign, to ``decimals`` places; one that rounds to zero is +0.0000, never -0.0000."""
    return f"{round(value, decimals) + 0.0:+.{decimals}f}"  # round() as the format does; + 0.0 turns -0.0 into 0.0


def summarize(metrics: dict) -> dict:
    """The part of a COCO metrics dict the monitor tracks: AP, AP50 and per-class AP / AP50."""
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "per_class": metrics["per_class"]}


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        return file.seek(0, os.SEEK_END) == 0 or (file.seek(-1, os.SEEK_END) >= 0 and file.read(1) == b"\n")


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


@dataclass(frozen=True)
class Baseline:
    """The base detector's metrics on the validation set, and what identifies the detector and the set."""

    AP: float
    AP50: float
    per_class: dict
    source: str
    base_fingerprint: str
    val_fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Baseline":
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class ForgettingMonitor:
    """Baseline, records and reports of one output directory; only the main process (``writes``) writes files."""

    def __init__(self, output_dir: str | Path, max_ap_drop: float, writes: bool = True):
        self.output_dir = Path(output_dir)
        self.max_ap_drop = max_ap_drop
        self.writes = writes
        self.baseline_path = self.output_dir / "baseline.json"
        self.log_path = self.output_dir / "metrics.jsonl"
        self.baseline: Baseline | None = None
        self.lineage: list[str] = []  # run ids of the current run's phases; records of other runs are left out
        self._logged: list[dict] | None = None  # every readable record of metrics.jsonl, read once, then appended to

    def directory_baseline(self) -> Baseline | None:
        if not self.baseline_path.is_file():
            return None
        try:
            return Baseline.from_dict(json.loads(self.baseline_path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise MonitorError(
                f"{self.baseline_path}: unreadable ({type(error).__name__}: {error}); delete it and the base is "
                "measured again at the next phase start, or use another --output-dir"
            ) from None

    def adopt_baseline(
        self,
        carried: dict | None,
        base_state: Callable[[], dict],
        val_fingerprint: str,
        measure: Callable[[], dict],
        phase: int,
    ) -> Baseline:
        """The run's baseline: ``carried`` from an earlier phase of the run, or ``measure()`` of the base detector.

        ``base_state()`` gives the detector's weights (fingerprinted when nothing is carried). The directory's
        ``baseline.json`` must describe the same base and validation set; it is written when absent.
        """
        baseline = Baseline.from_dict(carried) if carried is not None else None
        fingerprint = baseline.base_fingerprint if baseline is not None else state_fingerprint(base_state())
        if baseline is not None and baseline.val_fingerprint != val_fingerprint:
            raise MonitorError(
                "data.val_annotations: the validation set differs from the one the base detector was measured on in "
                "phase 1 of this run; ΔAP would compare different sets: restore it, or start a new run from phase 1"
            )
        existing = self.directory_baseline()
        if existing is not None and existing.base_fingerprint != fingerprint:
            raise MonitorError(
                f"{self.output_dir}: holds the run of another base detector ({existing.source}, AP {existing.AP:.4f}); "
                "a directory belongs to one base: pass another --output-dir"
            )
        if existing is not None and existing.val_fingerprint != val_fingerprint:
            raise MonitorError(
                f"{self.output_dir}: its baseline was measured on another validation set; restore "
                "data.val_annotations or pass another --output-dir"
            )
        if baseline is None:
            baseline = existing
        if baseline is None:
            measured = summarize(measure())
            baseline = Baseline(
                **measured,
                source=f"measured at the start of phase {phase}",
                base_fingerprint=fingerprint,
                val_fingerprint=val_fingerprint,
            )
        if self.writes and existing != baseline:
            atomic_write_text(self.baseline_path, json.dumps(baseline.to_dict(), indent=2))
        self.baseline = baseline
        return baseline

    def record(self, phase: int, epoch: int, metrics: dict, train_stats: dict) -> dict:
        """Append one epoch (1-based) to the log; returns the record with its deltas against the baseline.

        ``metrics``: COCO metrics with ``text`` (``multimodal.model.text_usage.evaluate_with_text``)."""
        record = {"run_id": self.lineage[-1], "phase": phase, "epoch": epoch, **summarize(metrics)}
        record |= {"text": metrics["text"], "train": train_stats}
        if self.baseline is not None and PHASES[phase].compares_to_base:
            record["delta_AP"] = metrics["AP"] - self.baseline.AP
            record["delta_AP50"] = metrics["AP50"] - self.baseline.AP50
            record["delta_per_class"] = {
                name: values["AP"] - self.baseline.per_class[name]["AP"]
                for name, values in metrics["per_class"].items()
                if name in self.baseline.per_class
            }
        if self.writes:
            torn = self.log_path.is_file() and not _ends_with_newline(self.log_path)
            with self.log_path.open("a") as log:
                # After a torn last line, start a new one so that the fragment stays a line of its own.
                log.write(("\n" if torn else "") + json.dumps(record) + "\n")
        if self._logged is not None:
            self._logged.append(record)
        return record

    def earlier_best(self, path: Path) -> float | None:
        """The score of ``path`` (a phaseN_best.pth) when an earlier run wrote it: this run's best will replace it."""
        if not path.is_file():
            return None
        try:
            progress = read_phase_checkpoint(path).progress
        except CheckpointError:
            return None  # unreadable or of another version: there is no score to compare with
        return None if progress.lineage[-1] in self.lineage else progress.best_metric

    def exceeded(self, record: dict) -> bool:
        """True when AP fell further below the baseline than ``max_ap_drop``."""
        return "delta_AP" in record and -record["delta_AP"] > self.max_ap_drop

    def _read_log(self) -> list[dict]:
        """Every record of ``metrics.jsonl``; lines that are no JSON record are reported in one warning and skipped."""
        records, unreadable = [], []
        lines = self.log_path.read_bytes().split(b"\n") if self.log_path.is_file() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                unreadable.append(str(number))
        if unreadable:
            _warn(
                f"{self.log_path}:{','.join(unreadable)}: unreadable record{'s' if len(unreadable) > 1 else ''} (a run "
                "killed while writing, or bytes that are not a UTF-8 JSON record); skipped"
            )
        return records

    def records(self) -> list[dict]:
        """The current run's records, in order, each epoch once.

        A resume from an earlier checkpoint writes epochs again under the same run id: its record of epoch e replaces
        the earlier one and drops the earlier records of the epochs after e, the branch the resume cut off.
        """
        if self._logged is None:
            self._logged = self._read_log()
        current: list[dict] = []
        for record in self._logged:
            if record.get("run_id") in self.lineage:
                branch = (record["run_id"], record["phase"])
                current = [
                    kept
                    for kept in current
                    if (kept["run_id"], kept["phase"]) != branch or kept["epoch"] < record["epoch"]
                ]
                current.append(record)
        return current

    def phase_summary(self) -> list[dict]:
        """Per phase: the last epoch's AP/AP50, the lowest AP seen during it and the last text-reliance figures."""
        rows: dict[int, dict] = {}
        for record in self.records():
            row = rows.setdefault(record["phase"], {"phase": record["phase"], "worst_AP": record["AP"]})
            row.update(AP=record["AP"], AP50=record["AP50"], epochs=record["epoch"])
            row["worst_AP"] = min(row["worst_AP"], record["AP"])
            if "reliance" in record["text"]:
                row["reliance"] = record["text"]["reliance"]
        for row in rows.values():
            if self.baseline is not None and PHASES[row["phase"]].compares_to_base:
                row["delta_AP"] = row["AP"] - self.baseline.AP
                row["max_drop"] = max(0.0, self.baseline.AP - row["worst_AP"])
        return [rows[phase] for phase in sorted(rows)]

    def summary_table(self) -> str:
        """Plain-text per-phase table: base AP, AP after each phase, Δ to the base, worst drop, text reliance."""
        header = f"{'stage':<10}{'AP':>8}{'AP50':>8}{'ΔAP':>8}{'max drop':>10}{'Δ perm':>9}{'Δ mean':>9}"
        lines = [header]
        if self.baseline is not None:
            lines.append(f"{'base':<10}{self.baseline.AP:>8.3f}{self.baseline.AP50:>8.3f}")
        for row in self.phase_summary():
            delta = signed(row["delta_AP"], 3) if "delta_AP" in row else ""
            drop = f"{row['max_drop']:.3f}" if "max_drop" in row else ""
            reliance = row.get("reliance", {})
            permuted, mean = (signed(reliance[key], 3) if key in reliance else "" for key in ("permuted", "mean"))
            lines.append(
                f"{'phase ' + str(row['phase']):<10}{row['AP']:>8.3f}{row['AP50']:>8.3f}{delta:>8}{drop:>10}"
                f"{permuted:>9}{mean:>9}"
            )
        return "\n".join(lines)

    def text_verdict(self) -> str:
        """One plain sentence: was the text used, by the last text-reliance figures of the current run?"""
        measured = [record for record in self.records() if "reliance" in record["text"]]
        if not measured:
            return "Text reliance was not measured (monitor.text_reliance: never)."
        record = measured[-1]
        reliance, where = record["text"]["reliance"], f"phase {record['phase']}, epoch {record['epoch']}"
        figures = (
            f"AP(real) − AP(mean description) = {signed(reliance['mean'])}, AP(real) − AP(descriptions permuted "
            f"across classes) = {signed(reliance['permuted'])}"
        )
        if reliance["permuted"] == 0 and reliance["mean"] == 0:
            return f"The text was not used ({where}): {figures}, exactly."
        if max(abs(reliance["permuted"]), abs(reliance["mean"])) < NEGLIGIBLE_AP:
            return f"The text was barely used ({where}): {figures}; under {NEGLIGIBLE_AP} AP either way."
        return f"The text was used ({where}): {figures}; positive means the text helps."

    def write_summary(self, machine_info: dict, seconds: float, command: list[str]) -> dict:
        """``summary.json``: the per-phase table of the current run, the text verdict, the machine and the time."""
        summary = {
            "run_id": self.lineage[-1],
            "lineage": self.lineage,
            "command": command,
            "baseline": {"AP": self.baseline.AP, "AP50": self.baseline.AP50} if self.baseline else None,
            "phases": self.phase_summary(),
            "text": self.text_verdict(),
            "machine": machine_info,
            "wall_seconds": round(seconds, 1),
        }
        if self.writes:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def write_report(self, notes: list[str] = ()) -> None:
        """``report.md`` (per-phase and per-epoch tables, per-class deltas) and ``curves.png``, for the current run."""
        from multimodal.train.curves import plot_curves  # matplotlib loads only when a report is written

        records, baseline = self.records(), self.baseline
        lines = ["# Progressive fine-tuning report", "", f"Run {self.lineage[-1]} in `{self.output_dir}`.", ""]
        lines += [*notes, "", "## Per phase", "", "```", self.summary_table(), "```", "", self.text_verdict(), ""]
        lines += [SIGNAL_NOTE, "", RELIANCE_NOTE, "", "## Per epoch", ""]
        lines += [
            "| phase | epoch | AP | AP50 | ΔAP | added signal | Δ perm | Δ mean |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            delta = signed(r["delta_AP"]) if "delta_AP" in r else ""
            signal = ", ".join(f"{value:.4f}" for value in r["text"].get("added_signal", []))
            reliance = r["text"].get("reliance", {})
            permuted, mean = (signed(reliance[key]) if key in reliance else "" for key in ("permuted", "mean"))
            lines.append(
                f"| {r['phase']} | {r['epoch']} | {r['AP']:.4f} | {r['AP50']:.4f} | {delta} | {signal} | {permuted} "
                f"| {mean} |"
            )
        if records and "delta_per_class" in records[-1]:
            last = records[-1]
            lines += ["", f"## Per-class AP, last epoch (phase {last['phase']}) vs base", ""]
            lines += ["| class | base AP | AP | Δ |", "|---|---|---|---|"]
            for name, delta in last["delta_per_class"].items():
                lines.append(
                    f"| {name} | {baseline.per_class[name]['AP']:.4f} | {last['per_class'][name]['AP']:.4f} "
                    f"| {signed(delta)} |"
                )
        if self.writes:
            atomic_write_text(self.output_dir / "report.md", "\n".join(lines) + "\n")
            base = (baseline.AP, baseline.AP50) if baseline is not None else None
            plot_curves(records, base, self.max_ap_drop, self.output_dir / "curves.png", self.lineage[-1])


def format_epoch(record: dict, epochs: int, nonfinite_steps: int) -> str:
    """The log line of one epoch's record."""
    train_stats = record["train"]
    line = f"phase {record['phase']} epoch {record['epoch']}/{epochs}: loss {train_stats.get('loss', float('nan')):.4f}"
    line += f"  AP {record['AP']:.4f}  AP50 {record['AP50']:.4f}"
    if "delta_AP" in record:
        line += f"  ΔAP {signed(record['delta_AP'])}"
    text = record["text"]
    if "added_signal" in text:
        line += f"  added signal {[round(value, 4) for value in text['added_signal']]}"
    if "reliance" in text:
        line += (
            f"  text reliance: Δperm {signed(text['reliance']['permuted'])} Δmean {signed(text['reliance']['mean'])}"
        )
    line += f"  {train_stats['images_per_s']:.1f} img/s"
    return line + (f"  non-finite steps {nonfinite_steps}" if nonfinite_steps else "")
