"""The forgetting guard: the base detector's accuracy as the baseline of an output directory, and the epochs that fall
too far below it.

``baseline.json`` in the output directory holds AP, AP50 and per-class AP of the base detector, with fingerprints of
its weights and of the validation annotations: a directory belongs to one base detector and one validation set, and
a run from another base or on another validation set is refused.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from deim_lib.errors import CheckpointError, UserError
from multimodal.files import atomic_write_text, file_sha256
from multimodal.train.checkpoint import read_phase_checkpoint
from multimodal.train.records import Baseline, EpochRecord, summarize


class MonitorError(UserError):
    """The output directory's records belong to another base detector or validation set, or are unreadable."""


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ForgettingGuard:
    """The baseline of ``output_dir`` and the ``max_ap_drop`` an epoch may fall below it; only the main process
    (``writes``) writes ``baseline.json``."""

    def __init__(self, output_dir: str | Path, max_ap_drop: float, writes: bool = True):
        self.output_dir = Path(output_dir)
        self.max_ap_drop = max_ap_drop
        self.writes = writes
        self.baseline_path = self.output_dir / "baseline.json"

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
        val_annotations: str | Path,
        measure: Callable[[], dict],
        phase: int,
    ) -> Baseline:
        """The run's baseline: ``carried`` from an earlier phase of the run, or ``measure()`` of the base detector.

        ``base_state()`` gives the detector's weights (fingerprinted when nothing is carried); ``val_annotations`` is
        the validation set's annotation file. The directory's ``baseline.json`` must describe the same base and
        validation set; it is written when absent.
        """
        val_fingerprint = file_sha256(val_annotations)
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
            baseline = Baseline(
                **summarize(measure()),
                source=f"measured at the start of phase {phase}",
                base_fingerprint=fingerprint,
                val_fingerprint=val_fingerprint,
            )
        if self.writes and existing != baseline:
            atomic_write_text(self.baseline_path, json.dumps(baseline.to_dict(), indent=2))
        return baseline

    def exceeded(self, record: EpochRecord) -> bool:
        """True when AP fell further below the baseline than ``max_ap_drop``."""
        return record.delta_AP is not None and -record.delta_AP > self.max_ap_drop

    def earlier_best(self, path: Path, lineage: list[str]) -> float | None:
        """The score of ``path`` (a phaseN_best.pth) when a run other than the one of ``lineage`` wrote it: this run's
        best will replace it."""
        if not path.is_file():
            return None
        try:
            progress = read_phase_checkpoint(path).progress
        except CheckpointError:
            return None  # unreadable or of another version: there is no score to compare with
        return None if progress.lineage[-1] in lineage else progress.best_metric
