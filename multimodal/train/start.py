"""Where a phase starts, from the command line's ``--resume`` / ``--init``: one meaning per flag.

- ``--resume FILE`` continues the phase FILE was written in, exactly (weights, EMA, optimiser, RNG, position), and
  nothing else; FILE must be that phase's ``phaseN_last.pth``, unfinished (or finished with more epochs now). The run's
  configuration is the one stored in FILE; a ``--config`` or ``--set`` given with it overrides only the keys it names,
  and only keys that steer the run (its length, its reports) may change.
- ``--init FILE`` starts a phase from weights: an official DEIMv2 checkpoint (the detector), or a checkpoint of an
  earlier phase (its evaluated weights: detector, fusion, text embeddings, baseline).
- Neither: phase N ≥ 1 starts from ``phase{N-1}_best.pth`` in the output directory, phases 0–1 from
  ``model.weights``, phase 0 from a fresh detector. What was chosen is always printed.
"""

from dataclasses import dataclass, field
from pathlib import Path

from deim_lib.checkpoint import detector_state_dict, read_checkpoint
from deim_lib.errors import CheckpointError
from multimodal.config import ConfigError, TrainConfig, config_from_values, load_config, resume_differences
from multimodal.train.checkpoint import PhaseCheckpoint, checkpoint_path, is_phase_checkpoint, read_phase_checkpoint


@dataclass
class StartPoint:
    """The weights (and, for a resume, the whole state) a phase starts from.

    ``resume``: the checkpoint continued exactly, or None. ``detector_state``/``fusion_state``: weights to load (None:
    keep the freshly built ones). ``text_embeddings``, ``baseline``, ``lineage``: carried over from an earlier phase of
    the same run, None / empty from official weights.
    """

    description: str
    resume: PhaseCheckpoint | None = None
    detector_state: dict | None = None
    fusion_state: dict | None = None
    text_embeddings: dict | None = None
    baseline: dict | None = None
    lineage: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _from_checkpoint(checkpoint: PhaseCheckpoint, description: str) -> StartPoint:
    detector, fusion = checkpoint.weights()
    return StartPoint(
        description,
        detector_state=detector,
        fusion_state=fusion,
        text_embeddings=checkpoint.text_embeddings,
        baseline=checkpoint.progress.baseline,
        lineage=list(checkpoint.progress.lineage),
        class_names=checkpoint.info.class_names,
    )


def _resume(
    phase: int | None, path: Path, checkpoint: PhaseCheckpoint, config: TrainConfig, eval_only: bool
) -> StartPoint:
    found = checkpoint.phase
    phase = found if phase is None else phase
    if checkpoint.kind != "last":
        last = checkpoint_path(path.parent, found, "last")
        raise CheckpointError(
            f"--resume {path}: holds the best weights of phase {found}, not a resume point; continue the phase with "
            f"--resume {last}, or evaluate these weights with --init {path} --eval-only"
        )
    if found != phase:
        raise CheckpointError(
            f"--resume {path}: a phase-{found} checkpoint; --resume continues that same phase (--phase {found} "
            f"--resume {path}); to start phase {phase} from its weights use --init"
        )
    stored_epochs = checkpoint.info.config[f"phase{phase}"]["epochs"]
    if checkpoint.finished and config.phase(phase).epochs <= stored_epochs and not eval_only:
        raise CheckpointError(
            f"--resume {path}: phase {phase} is finished ({checkpoint.progress.state.epoch} epochs); start phase "
            f"{phase + 1} (--phase {phase + 1} picks up phase{phase}_best.pth), or raise phase{phase}.epochs "
            f"(evaluate it with --resume {path} --eval-only)"
        )
    state = checkpoint.progress.state
    start = _from_checkpoint(
        checkpoint, f"the resume point {path} (phase {phase}, epoch {state.epoch + 1}, step {state.step})"
    )
    start.resume = checkpoint
    if not eval_only:
        # Training continues from the training weights; the EMA, optimiser and RNG come back once the phase is set up.
        # (--eval-only keeps the EMA weights: those are what the run evaluated.)
        start.detector_state, start.fusion_state = checkpoint.detector, checkpoint.fusion
    return start


def _init(phase: int, path: Path, eval_only: bool) -> StartPoint:
    data = read_checkpoint(path)
    if not is_phase_checkpoint(data):
        state, where = detector_state_dict(data, path)
        return StartPoint(f"official DEIMv2 weights from {path} ({where})", detector_state=state)
    checkpoint = PhaseCheckpoint.from_dict(data, path)
    found = checkpoint.phase
    if found >= phase and not eval_only:
        raise CheckpointError(
            f"--init {path}: a phase-{found} checkpoint cannot start phase {phase}; a phase starts from an earlier "
            f"phase's weights or official DEIMv2 weights (continue phase {found} with --resume "
            f"{checkpoint_path(path.parent, found, 'last')}, or run --phase {found + 1})"
        )
    weights = "EMA weights" if checkpoint.ema_detector is not None else "weights"
    start = _from_checkpoint(checkpoint, f"the {weights} of phase {found} ({checkpoint.kind}) from {path}")
    best = checkpoint_path(path.parent, found, "best")
    if checkpoint.kind == "last" and best.is_file() and best.resolve() != path.resolve():
        start.notes.append(f"note: {path} holds the last epoch of phase {found}; its best epoch is in {best}")
    if not eval_only and found < phase - 1:
        start.notes.append(f"note: phase {phase} starts from phase {found}, skipping phase {found + 1}")
    return start


def resolve_start(
    phase: int, config: TrainConfig, output_dir: Path, init: str | None = None, eval_only: bool = False
) -> StartPoint:
    """The start point of a new ``phase`` (see the module docstring; ``open_resume`` continues one); every refusal is
    a one-line error with the fix."""
    if init is not None:
        return _init(phase, Path(init), eval_only)
    previous = checkpoint_path(output_dir, phase - 1, "best")
    if phase >= 1 and previous.is_file():
        start = _from_checkpoint(read_phase_checkpoint(previous), "")
        start.description = f"the best weights of phase {phase - 1} in {previous} (no --init given)"
        return start
    weights = config.model.weights
    if weights is not None and phase <= 1:
        state, where = detector_state_dict(read_checkpoint(weights), weights)
        return StartPoint(f"official DEIMv2 weights from model.weights {weights} ({where})", detector_state=state)
    if phase == 0:
        return StartPoint("a freshly initialised detector")
    raise CheckpointError(
        f"--phase {phase}: nothing to start from; pass --init BASE.pth (an official DEIMv2 checkpoint or a phase "
        f"{phase - 1} checkpoint), or run phase {phase - 1} into {output_dir} first (or set model.weights)"
    )


@dataclass(frozen=True)
class Resume:
    """A ``--resume FILE`` unpacked: the run's config (the stored one with the given overrides), its seed, the phase's
    start point and the ``"key: was → now"`` lines of what the overrides changed."""

    config: TrainConfig
    seed: int
    start: StartPoint
    changes: list[str]


def open_resume(
    path: str,
    config_file: str | None,
    overrides: list[str],
    phase: int | None,
    eval_only: bool,
    seed: int | None,
    init: str | None = None,
) -> Resume:
    """Read ``path`` once and everything a resumed run takes from it; ``phase`` None: the phase it was written in.

    The config is the stored one, then the keys ``config_file`` and ``overrides`` name; only keys that steer the run
    (its length, its reports) may change, and the seed may not: each refusal is one line naming the keys.
    """
    if init is not None:
        raise CheckpointError("--resume continues a phase with its own weights; --init starts one: pass only one")
    checkpoint = read_phase_checkpoint(path)
    try:
        stored = config_from_values(checkpoint.info.config)
    except ConfigError as error:
        raise CheckpointError(
            f"--resume {path}: its stored config does not fit this version ({error}); start a new run with --init"
        ) from None
    config = load_config(config_file, overrides, base=stored)
    start = _resume(phase, Path(path), checkpoint, config, eval_only)
    conflicts, changes = resume_differences(stored, config, start.resume.phase)
    if conflicts:
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's in what phase {start.resume.phase} trains "
            f"({'; '.join(conflicts)}); drop those keys to resume with the checkpoint's values, or start a new run "
            "with --init"
        )
    if seed is not None and seed != checkpoint.info.seed:
        raise ConfigError(
            f"--resume: the checkpoint was trained with --seed {checkpoint.info.seed}, not {seed}; drop --seed"
        )
    return Resume(config, checkpoint.info.seed, start, changes)
