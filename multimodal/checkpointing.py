"""Training checkpoints: atomic writes, plain-data contents, RNG states for exact resume.

A phase checkpoint is also an official-format DEIMv2 checkpoint: ``model`` and ``ema.module`` hold the detector's
state dict under the official key names, so official tools (and ``deim_lib.load_official_checkpoint``) read the
fine-tuned detector from it. Everything else (fusion weights, text embeddings, optimiser, RNG, history) sits beside.
"""

import os
import random
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deim_lib.checkpoint import CheckpointError, detector_state_dict, load_official_checkpoint, read_checkpoint
from multimodal.model import load_weights, split_state


def atomic_save(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a killed run never leaves half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "python_version_and_gauss": [random.getstate()[0], random.getstate()[2]],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, gauss = state["python_version_and_gauss"]
    random.setstate((version, tuple(state["python"]), gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output directory; an impossible or read-only one is a one-line error before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OSError(f"{path}: cannot create the output directory ({reason}); pass another --output-dir") from None
    if not os.access(path, os.W_OK):
        raise OSError(f"{path}: the output directory is not writable; pass another --output-dir")
    return path


def phase_checkpoint_path(output_dir: str | Path, phase: int, kind: str) -> Path:
    return Path(output_dir) / f"phase{phase}_{kind}.pth"


def training_checkpoint(**contents) -> dict:
    """The checkpoint dict: the given contents plus the official ``date`` field."""
    return {"date": datetime.now().isoformat(timespec="seconds"), **contents}


def save_training_checkpoint(path: Path, model: nn.Module, ema, optimizer: torch.optim.Optimizer, **contents) -> None:
    """Write a phase checkpoint: the detector under the official ``model`` / ``ema.module`` keys, the fusion beside
    it, optimiser and RNG states for exact resume, and ``contents`` (plain data: counters, config, history, ...)."""
    detector_state, fusion_state = split_state(model.state_dict())
    checkpoint = {"model": detector_state, "optimizer": optimizer.state_dict(), "rng": rng_state()}
    if fusion_state:
        checkpoint["fusion"] = fusion_state
    if ema is not None:
        ema_detector, ema_fusion = split_state(ema.module.state_dict())
        checkpoint["ema"] = {"module": ema_detector, "updates": ema.updates}
        if ema_fusion:
            checkpoint["fusion_ema"] = ema_fusion
    atomic_save(training_checkpoint(**checkpoint, **contents), path)


def restore_training_state(
    checkpoint: dict, model: nn.Module, ema, optimizer, state: dict
) -> tuple[list, float | None]:
    """Continue a phaseN_last.pth exactly: weights, EMA, optimiser, counters (into ``state``) and RNG streams.

    Returns the metrics history and the best metric so far.
    """
    load_weights(model, checkpoint["model"], checkpoint.get("fusion"), "--resume")
    if ema is not None and "ema" in checkpoint:
        load_weights(ema.module, checkpoint["ema"]["module"], checkpoint.get("fusion_ema"), "--resume (EMA)")
        ema.updates = checkpoint["ema"]["updates"]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"--resume: the optimizer state does not fit this phase's parameters ({error})") from None
    state.update(checkpoint["state"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["history"], checkpoint["best_metric"]


def read_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by this project (has ``phase``), with a clear error for any other file."""
    checkpoint = read_checkpoint(path)
    if "phase" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a checkpoint of train_progressive.py (no 'phase'); pass official DEIMv2 files with --init"
        )
    return checkpoint


@dataclass
class StartPoint:
    """Where a phase starts: a full resume, weights to load, or a fresh detector."""

    description: str
    resume: dict | None = None  # a phaseN_last.pth of this very phase, continued exactly
    detector_state: dict | None = None
    fusion_state: dict | None = None
    text_embeddings: dict | None = None


def best_weights(checkpoint: dict) -> tuple[dict, dict | None]:
    """(detector state, fusion state) of a checkpoint: the EMA weights when it has them, as evaluation used."""
    if "ema" in checkpoint:
        return checkpoint["ema"]["module"], checkpoint.get("fusion_ema")
    return checkpoint["model"], checkpoint.get("fusion")


def _weights_start(checkpoint: dict, description: str) -> StartPoint:
    detector, fusion = best_weights(checkpoint)
    return StartPoint(description, None, detector, fusion, checkpoint.get("text_embeddings"))


def resolve_start(
    phase: int, resume: str | None, init: str | None, output_dir: Path, base_weights: str | None
) -> StartPoint:
    """The start point of ``phase`` from ``--resume``, ``--init``, the previous phase's best checkpoint in
    ``output_dir``, or (phase 0 and 1) ``model.weights``; a phase ≥ 1 with none of them is an error naming the fix."""
    if resume is not None:
        checkpoint = read_training_checkpoint(resume)
        found = checkpoint["phase"]
        if found == phase and not checkpoint.get("finished", False):
            return StartPoint(f"resuming {resume} (phase {phase}, step {checkpoint['step']})", resume=checkpoint)
        if found in (phase, phase - 1):
            best = Path(resume).with_name(f"phase{found}_best.pth")
            if best.is_file() and Path(resume).name == f"phase{found}_last.pth":
                return _weights_start(read_training_checkpoint(best), f"best weights of phase {found} from {best}")
            return _weights_start(checkpoint, f"weights of phase {found} from {resume}")
        raise CheckpointError(
            f"{resume}: checkpoint of phase {found} cannot start phase {phase}; "
            f"phase {phase} continues phase {phase - 1} (run --phase {found + 1} next)"
        )
    if init is not None:
        checkpoint = read_checkpoint(init)
        if "phase" in checkpoint:
            return _weights_start(checkpoint, f"weights of phase {checkpoint['phase']} from {init}")
        return StartPoint(f"official DEIMv2 weights from {init}", detector_state=detector_state_dict(checkpoint, init))
    previous = phase_checkpoint_path(output_dir, phase - 1, "best")
    if phase >= 1 and previous.is_file():
        return _weights_start(read_training_checkpoint(previous), f"best weights of phase {phase - 1} from {previous}")
    if base_weights is not None and phase <= 1:
        state = load_official_checkpoint(base_weights)
        return StartPoint(f"official DEIMv2 weights from {base_weights}", detector_state=state)
    if phase == 0:
        return StartPoint("a freshly initialised detector")
    raise CheckpointError(
        f"--phase {phase}: nothing to start from; pass --init BASE.pth (an official DEIMv2 checkpoint) or "
        f"--resume {previous} (or set model.weights)"
    )
