"""One evaluated epoch as a typed record, the base detector's ``Baseline`` it is compared with, and ``metrics.jsonl``,
the log of the records of an output directory.

``metrics.jsonl`` holds one record per evaluated epoch of any phase, each with its ``run_id``; a line that is not a
record (a run killed mid-write, bytes that are not UTF-8) is reported and skipped. A resume from an earlier checkpoint
writes its epochs again: the latest record of an epoch wins, and the epochs after it that the resume cut off no longer
count. ``EpochRecord.to_dict`` is the line's JSON: older files and other tools (experiments/) read it, so it keeps its
keys and their order.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from multimodal.phase_table import PHASES


@dataclass(frozen=True)
class Reliance:
    """AP(real) − AP(permuted descriptions) and AP(real) − AP(mean description), with the two APs they come from."""

    AP_permuted: float
    permuted: float
    AP_mean: float
    mean: float

    def to_dict(self) -> dict:
        return {"AP_permuted": self.AP_permuted, "permuted": self.permuted, "AP_mean": self.AP_mean, "mean": self.mean}

    @classmethod
    def from_dict(cls, data: dict) -> "Reliance":
        return cls(data["AP_permuted"], data["permuted"], data["AP_mean"], data["mean"])


@dataclass(frozen=True)
class TextFigures:
    """The text figures of an evaluation (``multimodal.model.text_usage.evaluate_with_text``); all None without text.

    ``added_signal``: per fusion level, fine → coarse; ``classifier_bias``: RMS of the text classifier's bias, None
    without one; ``reliance``: None when it was not measured."""

    added_signal: list[float] | None = None
    classifier_bias: float | None = None
    reliance: Reliance | None = None

    def to_dict(self) -> dict:
        if self.added_signal is None:
            return {}
        text = {"added_signal": self.added_signal, "classifier_bias": self.classifier_bias}
        return text | ({"reliance": self.reliance.to_dict()} if self.reliance is not None else {})

    @classmethod
    def from_dict(cls, text: dict) -> "TextFigures":
        reliance = Reliance.from_dict(text["reliance"]) if "reliance" in text else None
        return cls(text.get("added_signal"), text.get("classifier_bias"), reliance)


@dataclass(frozen=True)
class EpochRecord:
    """One evaluated epoch (1-based) of a phase of run ``run_id``.

    ``per_class``: {class name: {"AP", "AP50"}}; ``train``: the epoch's mean losses (``loss`` and its terms) with
    ``lr``, ``images_per_s``, ``seconds``, ``step`` and ``epoch_seconds``. The deltas against the base detector are
    set in the phases that compare to it, None otherwise."""

    run_id: str
    phase: int
    epoch: int
    AP: float
    AP50: float
    per_class: dict[str, dict[str, float]]
    text: TextFigures
    train: dict[str, float]
    delta_AP: float | None = None  # noqa: N815 (named as its key in metrics.jsonl)
    delta_AP50: float | None = None  # noqa: N815
    delta_per_class: dict[str, float] | None = None

    def to_dict(self) -> dict:
        data = {"run_id": self.run_id, "phase": self.phase, "epoch": self.epoch, "AP": self.AP, "AP50": self.AP50}
        data |= {"per_class": self.per_class, "text": self.text.to_dict(), "train": self.train}
        if self.delta_AP is not None:
            data |= {"delta_AP": self.delta_AP, "delta_AP50": self.delta_AP50, "delta_per_class": self.delta_per_class}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EpochRecord":
        deltas = {key: data[key] for key in ("delta_AP", "delta_AP50", "delta_per_class") if key in data}
        return cls(
            run_id=data["run_id"],
            phase=data["phase"],
            epoch=data["epoch"],
            AP=data["AP"],
            AP50=data["AP50"],
            per_class=data["per_class"],
            text=TextFigures.from_dict(data["text"]),
            train=data["train"],
            **deltas,
        )


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


def summarize(metrics: dict) -> dict:
    """The part of a COCO metrics dict that is tracked: AP, AP50 and per-class AP / AP50."""
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "per_class": metrics["per_class"]}


def epoch_record(
    run_id: str, phase: int, epoch: int, metrics: dict, train_stats: dict, baseline: Baseline | None
) -> EpochRecord:
    """The record of epoch ``epoch`` (1-based), with its deltas against ``baseline`` in a phase that compares to the
    base.

    ``metrics``: COCO metrics with ``text`` (``multimodal.model.text_usage.evaluate_with_text``)."""
    deltas = {}
    if baseline is not None and PHASES[phase].compares_to_base:
        deltas = {
            "delta_AP": metrics["AP"] - baseline.AP,
            "delta_AP50": metrics["AP50"] - baseline.AP50,
            "delta_per_class": {
                name: values["AP"] - baseline.per_class[name]["AP"]
                for name, values in metrics["per_class"].items()
                if name in baseline.per_class
            },
        }
    text = TextFigures.from_dict(metrics["text"])
    return EpochRecord(run_id, phase, epoch, **summarize(metrics), text=text, train=train_stats, **deltas)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        return file.seek(0, os.SEEK_END) == 0 or (file.seek(-1, os.SEEK_END) >= 0 and file.read(1) == b"\n")


class MetricsLog:
    """``metrics.jsonl`` of one output directory; only the main process (``writes``) writes it."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self._logged: list[EpochRecord] | None = None  # every readable record of the file, read once, then appended to

    def append(self, record: EpochRecord) -> None:
        if self.writes:
            torn = self.path.is_file() and not _ends_with_newline(self.path)
            with self.path.open("a") as log:
                # After a torn last line, start a new one so that the fragment stays a line of its own.
                log.write(("\n" if torn else "") + json.dumps(record.to_dict()) + "\n")
        if self._logged is not None:
            self._logged.append(record)

    def _read(self) -> list[EpochRecord]:
        """Every record of the file; lines that are no record are reported in one warning and skipped."""
        records, unreadable = [], []
        lines = self.path.read_bytes().split(b"\n") if self.path.is_file() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(EpochRecord.from_dict(json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                unreadable.append(str(number))
        if unreadable:
            print(
                f"warning: {self.path}:{','.join(unreadable)}: unreadable record{'s' if len(unreadable) > 1 else ''} "
                "(a run killed while writing, or bytes that are not a UTF-8 JSON record); skipped",
                file=sys.stderr,
            )
        return records

    def records(self, lineage: list[str]) -> list[EpochRecord]:
        """The records of the run whose phases have the run ids ``lineage``, in order, each epoch once.

        A resume from an earlier checkpoint writes epochs again under the same run id: its record of epoch e replaces
        the earlier one and drops the earlier records of the epochs after e, the branch the resume cut off.
        """
        if self._logged is None:
            self._logged = self._read()
        current: list[EpochRecord] = []
        for record in self._logged:
            if record.run_id in lineage:
                branch = (record.run_id, record.phase)
                current = [kept for kept in current if (kept.run_id, kept.phase) != branch or kept.epoch < record.epoch]
                current.append(record)
        return current
