"""The phase checkpoint: one schema for what ``train_progressive.py`` writes and every other command reads.

On disk it is a dict of plain data (loadable with ``torch.load(weights_only=True)``) that is also an official DEIMv2
checkpoint: ``model`` is the detector's state dict under the official key names, ``ema = {"module": state dict,
"updates": n}`` its EMA and ``date`` the official date field, so official tools read the fine-tuned detector. The
text-fusion weights, the class text embeddings and the run's bookkeeping sit beside them. (With
``model.class_scores: text`` the score heads are text maps with keys of their own, which official tools cannot read;
``multimodal.tools.export`` gives such a detector as ONNX.) ``PhaseCheckpoint.to_dict``
and ``PhaseCheckpoint.from_dict`` are the only code that knows these keys.

Two kinds: ``last`` (every epoch, or every ``checkpoint_every_steps``) is a resume point and carries the optimiser
and RNG states; ``best`` (the best epoch) holds weights only. ``rng_state`` and ``set_rng_state`` turn the Python,
NumPy and torch RNG streams into plain data and back.
"""

import dataclasses
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deim_lib.checkpoint import read_checkpoint
from deim_lib.errors import CheckpointError
from multimodal.files import atomic_write

SCHEMA = 2  # the ``schema`` entry; older files have none
KINDS = ("last", "best")


@dataclass
class TrainingState:
    """Where a phase stands: what an exact resume needs besides weights, optimiser and RNG (no config values)."""

    epoch: int = 0  # the epoch in progress, i.e. the number of finished epochs
    batch: int = 0  # batches of that epoch already consumed, taken or skipped: what a resume skips
    step: int = 0  # optimiser steps taken in the phase (the LR schedule's position)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    # The epoch's loss so far, so that a resumed epoch reports the mean over all of its steps: sums per loss term
    # and the number of steps taken in it.
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)
    epoch_steps_taken: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingState":
        # Files written before the epoch's loss sums were kept lack them: such an epoch reports its resumed part only.
        return cls(
            epoch=int(data["epoch"]),
            batch=int(data["batch"]),
            step=int(data["step"]),
            nonfinite_in_a_row=int(data["nonfinite_in_a_row"]),
            nonfinite_total=int(data["nonfinite_total"]),
            epoch_loss_sums={name: float(value) for name, value in data.get("epoch_loss_sums", {}).items()},
            epoch_steps_taken=int(data.get("epoch_steps_taken", 0)),
        )


@dataclass
class RunInfo:
    """What every checkpoint of a run says about it: the detector's shape, its classes, the config and the seed.

    ``category_ids``: the dataset's category id of each label, so predictions can be written in the dataset's ids.
    """

    variant: str
    image_size: int
    class_names: list[str]
    category_ids: list[int]
    config: dict
    seed: int


@dataclass
class PhaseProgress:
    """A phase's bookkeeping. ``lineage``: the run ids of the phases this one continues, its own last; ``history``:
    per epoch {"epoch", "AP", "AP50"}; ``baseline``: the base detector's metrics and fingerprints
    (``multimodal.train.records.Baseline.to_dict``), None in phase 0."""

    state: TrainingState
    lineage: list[str]
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    baseline: dict | None = None

    @property
    def run_id(self) -> str:
        return self.lineage[-1]

    @classmethod
    def new(cls, lineage: list[str], baseline: dict | None) -> "PhaseProgress":
        """A phase at its first step, ``lineage`` ending with its own run id."""
        return cls(TrainingState(), lineage, baseline=baseline)


@dataclass
class PhaseCheckpoint:
    """Everything a phase leaves behind. Weights are state dicts on the CPU; everything else is plain data.

    ``detector``/``fusion``: the training weights (fusion empty in phase 0); ``ema_detector``/``ema_fusion``: the EMA
    weights, which evaluation uses (None without EMA); ``text_embeddings``: ``TextEmbeddings.to_dict()``, phases ≥ 1.
    """

    phase: int
    kind: str
    info: RunInfo
    progress: PhaseProgress
    detector: dict[str, Tensor]
    fusion: dict[str, Tensor]
    ema_detector: dict[str, Tensor] | None
    ema_fusion: dict[str, Tensor] | None
    ema_updates: int
    text_embeddings: dict | None
    finished: bool
    optimizer: dict | None = None  # "last" only
    rng: dict | None = None  # "last" only
    date: str = ""

    def weights(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(detector, fusion) state dicts as evaluation used them: the EMA weights when there are any."""
        if self.ema_detector is not None:
            return self.ema_detector, self.ema_fusion or {}
        return self.detector, self.fusion

    def to_dict(self) -> dict:
        data = {"date": self.date or datetime.now().isoformat(timespec="seconds"), "schema": SCHEMA}
        data |= {"model": self.detector, "fusion": self.fusion}
        if self.ema_detector is not None:
            data["ema"] = {"module": self.ema_detector, "updates": self.ema_updates}
            data["fusion_ema"] = self.ema_fusion or {}
        progress = self.progress
        data |= {"phase": self.phase, "kind": self.kind, **dataclasses.asdict(self.info)}
        data |= {"text_embeddings": self.text_embeddings, "finished": self.finished, "state": progress.state.to_dict()}
        data |= {"lineage": progress.lineage, "history": progress.history, "best_metric": progress.best_metric}
        data["baseline"] = progress.baseline
        if self.kind == "last":
            data |= {"optimizer": self.optimizer, "rng": self.rng}
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str | Path) -> "PhaseCheckpoint":
        """The checkpoint in ``data`` (as ``torch.load`` returned it); a missing entry is an error naming ``source``."""
        if data.get("schema") != SCHEMA:
            found = f"schema {data['schema']}" if "schema" in data else "no schema entry"
            raise CheckpointError(
                f"{source}: a checkpoint of another version of train_progressive.py ({found}, this one reads schema "
                f"{SCHEMA}); its detector still loads as official DEIMv2 weights with --init"
            )
        try:
            ema = data.get("ema")
            info = RunInfo(**{f.name: data[f.name] for f in dataclasses.fields(RunInfo)})
            progress = PhaseProgress(
                TrainingState.from_dict(data["state"]),
                list(data["lineage"]),
                list(data["history"]),
                data["best_metric"],
                data["baseline"],
            )
            checkpoint = cls(
                phase=int(data["phase"]),
                kind=str(data["kind"]),
                info=info,
                progress=progress,
                detector=data["model"],
                fusion=dict(data["fusion"]),
                ema_detector=ema["module"] if ema is not None else None,
                ema_fusion=dict(data["fusion_ema"]) if ema is not None else None,
                ema_updates=int(ema["updates"]) if ema is not None else 0,
                text_embeddings=data["text_embeddings"],
                finished=bool(data["finished"]),
                optimizer=data.get("optimizer"),
                rng=data.get("rng"),
                date=str(data["date"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{source}: incomplete phase checkpoint (bad or missing entry {error}); is the file complete?"
            ) from None
        if checkpoint.kind not in KINDS:
            raise CheckpointError(f"{source}: unknown checkpoint kind {checkpoint.kind!r}")
        if checkpoint.kind == "last" and (checkpoint.optimizer is None or checkpoint.rng is None):
            raise CheckpointError(f"{source}: a 'last' checkpoint without optimiser or RNG state; is it complete?")
        return checkpoint


def is_phase_checkpoint(data: dict) -> bool:
    """Whether a loaded checkpoint dict was written by train_progressive.py (any version), not an official tool."""
    return "phase" in data and "model" in data


def read_phase_checkpoint(path: str | Path) -> PhaseCheckpoint:
    data = read_checkpoint(path)
    if not is_phase_checkpoint(data):
        raise CheckpointError(
            f"{path}: not a checkpoint of train_progressive.py (no 'phase'); pass official DEIMv2 files with --init"
        )
    return PhaseCheckpoint.from_dict(data, path)


def save_phase_checkpoint(path: str | Path, checkpoint: PhaseCheckpoint) -> None:
    """Write atomically: a killed run or a full disk never leaves a half-written or a lost checkpoint behind."""
    data = checkpoint.to_dict()
    atomic_write(path, lambda file: torch.save(data, file))


def checkpoint_path(output_dir: str | Path, phase: int, kind: str) -> Path:
    return Path(output_dir) / f"phase{phase}_{kind}.pth"


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) RNG states as plain data."""
    version, state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    rng = {
        "python": list(state),
        "python_version_and_gauss": [version, gauss],
        "numpy": numpy_state[1].tolist(),
        "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    version, gauss = rng["python_version_and_gauss"]
    random.setstate((version, tuple(rng["python"]), gauss))
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
