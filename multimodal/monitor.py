"""The forgetting monitor: the base detector's accuracy as a baseline, every epoch's change against it, the reports.

Files in the output directory: ``baseline.json`` (AP, AP50, per-class AP of the base detector on the validation set),
``metrics.jsonl`` (one line per evaluated epoch of any phase), ``report.md`` and ``curves.png`` (rewritten at the end
of every phase from the whole log).
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt


def summarize(metrics: dict) -> dict:
    """The part of a COCO metrics dict the monitor tracks: AP, AP50 and per-class AP / AP50."""
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "per_class": metrics["per_class"]}


class ForgettingMonitor:
    def __init__(self, output_dir: str | Path, max_ap_drop: float):
        self.output_dir = Path(output_dir)
        self.max_ap_drop = max_ap_drop
        self.baseline_path = self.output_dir / "baseline.json"
        self.log_path = self.output_dir / "metrics.jsonl"

    @property
    def baseline(self) -> dict | None:
        return json.loads(self.baseline_path.read_text()) if self.baseline_path.is_file() else None

    def save_baseline(self, metrics: dict, source: str) -> dict:
        baseline = {**summarize(metrics), "source": source}
        self.baseline_path.write_text(json.dumps(baseline, indent=2))
        return baseline

    def record(self, phase: int, epoch: int, metrics: dict, gates: list[float], train_stats: dict) -> dict:
        """Append one epoch to the log; returns the record with its deltas against the baseline."""
        record = {"phase": phase, "epoch": epoch, **summarize(metrics), "gates": gates, "train": train_stats}
        baseline = self.baseline
        if baseline is not None and phase >= 1:  # phase 0 trains the base itself
            record["delta_AP"] = metrics["AP"] - baseline["AP"]
            record["delta_AP50"] = metrics["AP50"] - baseline["AP50"]
            record["delta_per_class"] = {
                name: values["AP"] - baseline["per_class"][name]["AP"]
                for name, values in metrics["per_class"].items()
                if name in baseline["per_class"]
            }
        with self.log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        return record

    def exceeded(self, record: dict) -> bool:
        """True when AP fell further below the baseline than ``max_ap_drop``."""
        return "delta_AP" in record and -record["delta_AP"] > self.max_ap_drop

    def records(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def phase_summary(self) -> list[dict]:
        """Per phase: the last epoch's AP/AP50 and the largest drop below the baseline seen during it."""
        baseline = self.baseline
        rows: dict[int, dict] = {}
        for record in self.records():
            row = rows.setdefault(record["phase"], {"phase": record["phase"], "worst_AP": record["AP"]})
            row.update(AP=record["AP"], AP50=record["AP50"], epochs=record["epoch"] + 1)
            row["worst_AP"] = min(row["worst_AP"], record["AP"])
        for row in rows.values():
            if baseline is not None and row["phase"] >= 1:  # phase 0 trains the base itself
                row["delta_AP"] = row["AP"] - baseline["AP"]
                row["max_drop"] = max(0.0, baseline["AP"] - row["worst_AP"])
        return [rows[phase] for phase in sorted(rows)]

    def summary_table(self) -> str:
        """Plain-text per-phase table: base AP, AP after each phase, Δ to the base."""
        baseline = self.baseline
        lines = [f"{'stage':<10}{'AP':>8}{'AP50':>8}{'ΔAP':>8}{'max drop':>10}"]
        if baseline is not None:
            lines.append(f"{'base':<10}{baseline['AP']:>8.3f}{baseline['AP50']:>8.3f}{'':>8}{'':>10}")
        for row in self.phase_summary():
            delta = f"{row['delta_AP']:+.3f}" if "delta_AP" in row else ""
            drop = f"{row['max_drop']:.3f}" if "max_drop" in row else ""
            lines.append(f"{'phase ' + str(row['phase']):<10}{row['AP']:>8.3f}{row['AP50']:>8.3f}{delta:>8}{drop:>10}")
        return "\n".join(lines)

    def write_report(self, notes: list[str] = ()) -> None:
        """``report.md`` (per-phase and per-epoch tables, per-class deltas) and ``curves.png``."""
        records, baseline = self.records(), self.baseline
        lines = ["# Progressive fine-tuning report", "", *notes, "", "## Per phase", ""]
        lines += ["```", self.summary_table(), "```"]
        lines += ["", "## Per epoch", "", "| phase | epoch | AP | AP50 | ΔAP | gates |", "|---|---|---|---|---|---|"]
        for r in records:
            delta = f"{r['delta_AP']:+.4f}" if "delta_AP" in r else ""
            gates = ", ".join(f"{g:+.4f}" for g in r["gates"])
            lines.append(f"| {r['phase']} | {r['epoch']} | {r['AP']:.4f} | {r['AP50']:.4f} | {delta} | {gates} |")
        if records and "delta_per_class" in records[-1]:
            last = records[-1]
            lines += ["", f"## Per-class AP, last epoch (phase {last['phase']}) vs base", ""]
            lines += ["| class | base AP | AP | Δ |", "|---|---|---|---|"]
            for name, delta in last["delta_per_class"].items():
                lines.append(
                    f"| {name} | {baseline['per_class'][name]['AP']:.4f} | {last['per_class'][name]['AP']:.4f} "
                    f"| {delta:+.4f} |"
                )
        (self.output_dir / "report.md").write_text("\n".join(lines) + "\n")
        self._plot(records, baseline)

    def _plot(self, records: list[dict], baseline: dict | None) -> None:
        figure, axis = plt.subplots(figsize=(7, 4))
        for phase in sorted({r["phase"] for r in records}):
            points = [(i, r["AP"]) for i, r in enumerate(records) if r["phase"] == phase]
            axis.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", label=f"phase {phase}")
        if baseline is not None:
            axis.axhline(baseline["AP"], color="black", linestyle="--", label="base detector")
        axis.set_xlabel("epoch (all phases in order)")
        axis.set_ylabel("COCO AP")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.output_dir / "curves.png", dpi=100)
        plt.close(figure)
