"""Typed training configuration: frozen dataclasses, one strict loader for YAML files and ``--set key.sub=value``.

Precedence: dataclass defaults (or, for a resumed run, the configuration stored in its checkpoint) < YAML < ``--set``.
An unknown key is an error naming the closest valid key and where it was given (the YAML file or the ``--set``); a value
of the wrong type or outside its range is an error naming the key. YAML holds values only; structure lives in Python.
``model.image_size`` left unset resolves to the variant's input size, so every printed or stored value is the one used.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deim_lib.errors import UserError
from deim_lib.variants import VARIANTS
from multimodal.phase_table import PART_NAMES, PHASES, PhaseRule


class ConfigError(UserError):
    """A configuration problem; the message names the file or key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "atto"
    image_size: int | None = None  # None: the variant's input size (that of official checkpoints); resolved on load
    weights: str | None = None  # official DEIMv2 checkpoint used as the phase-1 base when --init is not given
    reinit_class_heads: bool = False  # allow a checkpoint with another class count (its class heads start fresh)
    pretrained_backbone: str | None = None  # official backbone weights for training phase 0 from scratch
    # How a class is scored: "linear", DEIMv2's free row per class in every score head; "text", from the class's text
    # embedding through one map shared by all classes (phases 1-3; fitted to the trained heads, so nothing changes at
    # the start). None: "text" when new_classes is "text", else "linear"; resolved on load.
    class_scores: str | None = None
    # With class_scores "text": the rank of the map shared by all classes (None: full, and the fit to the trained heads
    # is exact for up to text-width + 1 classes). A lower rank constrains more; below K − 1 for K classes (or the
    # query width) the scores no longer start exactly at the trained heads' (the log gives the residual).
    text_map_rank: int | None = None
    # Classes of the data that the start weights lack (known classes matched by name, or for an official file the
    # first K categories): "none" refuses them; "text" scores them from their descriptions (no labelled image
    # needed; with class_scores "linear", as ordinary rows composed from the known rows by the descriptions, which
    # then train freely); "random" gives them fresh rows, the control. The known classes keep their scores either way.
    new_classes: str = "none"


@dataclass(frozen=True)
class DataConfig:
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    # Class name → one or more descriptions for the text encoder; the order must equal the dataset's categories.
    classes: dict[str, list[str]] = field(default_factory=dict)
    synthetic_dir: str | None = None  # generate the synthetic demo dataset here when missing; replaces the paths
    synthetic_seed: int = 0
    synthetic_images: list[int] = field(default_factory=lambda: [300, 80])  # generated (train, val) images
    batch_size: int = 16  # global batch over all processes: each of N torchrun processes loads batch_size / N
    val_batch_size: int = 32
    num_workers: int = 2


@dataclass(frozen=True)
class TextEncoderConfig:
    backend: str = "open_clip"  # "open_clip" (CLIP text towers) or "huggingface" (a local transformers text model)
    # open_clip: a model name (ViT-B-32, …). huggingface: a model directory (config.json, tokenizer, weights), or
    # "package:NAME/SUBDIR" for a directory inside an installed Python package.
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"  # open_clip only: a tag, a local weights file, or null for random weights
    templates: list[str] = field(default_factory=lambda: ["{}"])
    precomputed: str | None = None  # a [K, D] .npy/.pt file of class embeddings used instead of the text model
    cache_dir: str | None = None  # None: <output_dir>/text_cache


@dataclass(frozen=True)
class FusionConfig:
    num_heads: int = 8
    text_aware_classification: bool = False


def _phase_defaults(rule: PhaseRule):
    return lambda: PhaseConfig(
        trainable=list(rule.trainable),
        lr=rule.lr,
        weight_decay=rule.weight_decay,
        epochs=rule.epochs,
        augmentation=rule.augmentation,
    )


@dataclass(frozen=True)
class PhaseConfig:
    # Their defaults are the phase table's row (multimodal/phase_table.py), set by TrainConfig.
    trainable: list[str]
    lr: float | None  # None: the variant's DEIMv2 base LR; 0: no weight update (a control run)
    weight_decay: float | None  # None: the variant's DEIMv2 weight decay
    epochs: int
    augmentation: str  # "finetune" or "deimv2"
    warmup_iters: int = 100
    scheduler: str = "cosine"  # "cosine" or "flatcosine"
    flat_fraction: float = 0.5  # flatcosine: fraction of the iterations kept at the base lr
    min_lr_ratio: float = 0.05
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmups: int = 1000
    grad_clip: float = 0.1  # 0: no clipping
    amp: bool = True  # bf16 autocast of the forward on CUDA
    amp_on_cpu: bool = False  # with amp, on the CPU too (not faster there for these models: docs/speed_notes.md)
    checkpoint_every_steps: int = 0  # 0: only at epoch ends


@dataclass(frozen=True)
class MonitorConfig:
    max_ap_drop: float = 0.05  # largest tolerated AP drop below the base detector
    on_drop: str = "warn"  # "warn" or "stop" (stop ends the phase; the best checkpoint is kept)
    max_nonfinite_steps: int = 20  # this many non-finite steps in a row stop the run
    best_metric: str = "AP"  # "AP" or "AP50": what phaseN_best.pth maximises
    # When evaluation repeats itself with permuted and with averaged class embeddings: "every" epoch, the "last" epoch
    # of each phase, or "never". Each repeat costs one more evaluation pass.
    text_reliance: str = "last"
    tensorboard: bool = True  # TensorBoard scalars in <output_dir>/tensorboard (loss, LR, AP, text figures)
    log_every_steps: int = 10  # loss terms and LR every this many optimiser steps (one host sync each)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    phase0: PhaseConfig = field(default_factory=_phase_defaults(PHASES[0]))
    phase1: PhaseConfig = field(default_factory=_phase_defaults(PHASES[1]))
    phase2: PhaseConfig = field(default_factory=_phase_defaults(PHASES[2]))
    phase3: PhaseConfig = field(default_factory=_phase_defaults(PHASES[3]))
    allow_backbone_training: bool = False  # phases 1–3 refuse to train the backbone unless this is true
    compile_frozen: bool = False  # torch.compile the frozen backbone and encoder (a one-off compile per input shape)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def phase(self, index: int) -> PhaseConfig:
        return getattr(self, f"phase{index}")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _convert(value, annotation, key: str):
    """``value`` checked (and, for dataclasses, built) against ``annotation``; a mismatch names ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is float and not isinstance(value, bool):
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept any number spelling for float fields.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if (annotation is int and isinstance(value, bool)) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = "", base=None):
    """``base`` (default: ``cls()``) with the fields in ``values`` replaced; nested sections merge field by field."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{name}'{hint}")
    updates = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping of {hints[name].__name__} fields, got {value!r}")
            updates[name] = _build(hints[name], value, f"{prefix}{name}.", getattr(base, name))
        else:
            updates[name] = _convert(value, hints[name], prefix + name)
    return dataclasses.replace(base, **updates)


def _assign(values: dict, assignment: str) -> dict:
    """``values`` with ``a.b=value`` applied; the value (parsed as YAML: numbers, booleans, lists, null) replaces
    whatever was at ``a.b``, so ``--set data.classes={}`` empties the mapping instead of merging into it."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value, e.g. phase1.epochs=3")
    *parents, leaf = key.strip().split(".")
    values = dict(values)
    node = values
    for part in parents:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
    return values


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return values


def load_config(path: str | Path | None, overrides: list[str] = (), base: "TrainConfig | None" = None) -> TrainConfig:
    """The validated configuration: ``base`` (default: the dataclass defaults), then the keys the YAML file at
    ``path`` gives, then each ``--set`` assignment in ``overrides``. An error names the file or the ``--set`` at fault.
    """
    config = TrainConfig() if base is None else base
    if path is not None:
        path = Path(path)
        try:
            config = _build(TrainConfig, _read_yaml(path), base=config)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}" if not str(error).startswith(str(path)) else str(error)) from None
    for assignment in overrides:
        try:
            config = _build(TrainConfig, _assign(config_to_dict(config), assignment))
        except ConfigError as error:
            raise ConfigError(
                f"--set {assignment}: {error}" if not str(error).startswith("--set") else str(error)
            ) from None
    try:
        return _resolved(config)
    except ConfigError as error:
        # A range or cross-field check: name the --set that gave the key, else the file.
        key = str(error).split(":")[0].split(" ")[0]
        given = [assignment for assignment in overrides if assignment.partition("=")[0].strip() == key]
        source = f"--set {given[-1]}" if given else (str(path) if path is not None else "")
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def config_from_values(values: dict) -> TrainConfig:
    """The validated configuration of a mapping of sections (as YAML reads it, or ``config_to_dict`` wrote it)."""
    return _resolved(_build(TrainConfig, values))


def stored_section(values: dict, name: str):
    """One typed section (``model``, ``fusion``, …) of a stored config mapping, the rest unchecked: what the tools need
    to rebuild a checkpoint's model, whose data paths may not exist on this machine."""
    return _build(typing.get_type_hints(TrainConfig)[name], values.get(name, {}), f"{name}.")


def _resolved(config: TrainConfig) -> TrainConfig:
    """``config`` validated, with ``model.image_size`` set to the variant's input size when it was left unset."""
    validate(config)
    if config.model.image_size is None:
        size = VARIANTS[config.model.variant].eval_size[0]
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, image_size=size))
    if config.model.class_scores is None:
        scores = "text" if config.model.new_classes == "text" else "linear"
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, class_scores=scores))
    return config


def _one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")


def _at_least(key: str, value, lowest, what: str = "") -> None:
    if value < lowest:
        raise ConfigError(f"{key}: {value} must be at least {lowest}{what}")


def _validate_phase(config: TrainConfig, rule: PhaseRule) -> None:
    index, phase = rule.index, config.phase(rule.index)
    name = f"phase{index}"
    if not phase.trainable:
        raise ConfigError(f"{name}.trainable is empty; name the parts to train, e.g. [{', '.join(rule.trainable)}]")
    for part in phase.trainable:
        if part not in PART_NAMES:
            raise ConfigError(f"{name}.trainable: unknown part {part!r}; choose from {', '.join(PART_NAMES)}")
    if "fusion" in phase.trainable and not rule.uses_text:
        raise ConfigError(f"{name}.trainable: phase {index} trains the detector without text; remove 'fusion'")
    if rule.uses_text and "backbone" in phase.trainable and not config.allow_backbone_training:
        raise ConfigError(
            f"{name}.trainable includes 'backbone', the stability anchor of progressive fine-tuning; "
            "remove it, or set allow_backbone_training: true to train it deliberately"
        )
    _one_of(f"{name}.scheduler", phase.scheduler, ("cosine", "flatcosine"))
    _one_of(f"{name}.augmentation", phase.augmentation, ("finetune", "deimv2"))
    if phase.lr is not None:
        _at_least(f"{name}.lr", phase.lr, 0, " (0 runs the phase without weight updates)")
    if phase.weight_decay is not None:
        _at_least(f"{name}.weight_decay", phase.weight_decay, 0)
    _at_least(f"{name}.epochs", phase.epochs, 1)
    for key in ("warmup_iters", "checkpoint_every_steps", "grad_clip"):
        _at_least(f"{name}.{key}", getattr(phase, key), 0)
    _at_least(f"{name}.ema_warmups", phase.ema_warmups, 1)
    for key in ("flat_fraction", "min_lr_ratio"):
        if not 0 <= getattr(phase, key) <= 1:
            raise ConfigError(f"{name}.{key}: {getattr(phase, key)} must lie in [0, 1]")
    if not 0 < phase.ema_decay < 1:
        raise ConfigError(f"{name}.ema_decay: {phase.ema_decay} must lie strictly between 0 and 1 (e.g. 0.9999)")


def validate(config: TrainConfig) -> None:
    """Ranges and checks that span several fields; each failure names the key and the fix."""
    for rule in PHASES:
        _validate_phase(config, rule)
    model, data, monitor, text = config.model, config.data, config.monitor, config.text_encoder
    _one_of("model.variant", model.variant, tuple(VARIANTS))
    _one_of("model.new_classes", model.new_classes, ("none", "text", "random"))
    if model.class_scores is not None:
        _one_of("model.class_scores", model.class_scores, ("linear", "text"))
    if model.text_map_rank is not None:
        _at_least("model.text_map_rank", model.text_map_rank, 1)
    if model.new_classes != "none" and model.reinit_class_heads:
        raise ConfigError(
            "model.reinit_class_heads replaces every class row, model.new_classes keeps the known ones: set only one"
        )
    if model.image_size is not None and (model.image_size < 32 or model.image_size % 32):
        raise ConfigError(f"model.image_size: {model.image_size} must be a positive multiple of 32")
    _one_of("monitor.best_metric", monitor.best_metric, ("AP", "AP50"))
    _one_of("monitor.on_drop", monitor.on_drop, ("warn", "stop"))
    _one_of("monitor.text_reliance", monitor.text_reliance, ("every", "last", "never"))
    _at_least("monitor.max_nonfinite_steps", monitor.max_nonfinite_steps, 1)
    _at_least("monitor.log_every_steps", monitor.log_every_steps, 1)
    _one_of("text_encoder.backend", text.backend, ("open_clip", "huggingface"))
    _at_least("fusion.num_heads", config.fusion.num_heads, 1)
    for key in ("batch_size", "val_batch_size"):
        _at_least(f"data.{key}", getattr(data, key), 1)
    _at_least("data.num_workers", data.num_workers, 0)
    if len(data.synthetic_images) != 2 or min(data.synthetic_images) < 1:
        raise ConfigError(f"data.synthetic_images: {data.synthetic_images} must be [train images, val images] ≥ 1")
    if not data.synthetic_dir:
        unset = [
            key
            for key in ("train_images", "train_annotations", "val_images", "val_annotations")
            if not getattr(data, key)
        ]
        if unset:
            raise ConfigError(
                f"data.{unset[0]} is not set: give data.train_images, data.train_annotations, data.val_images and "
                "data.val_annotations (or data.synthetic_dir for the generated demo data)"
            )


def config_to_dict(config: TrainConfig) -> dict:
    """Plain data (dicts, lists, numbers, strings) for checkpoints loaded with ``weights_only=True``."""
    return dataclasses.asdict(config)


def config_to_yaml(config: TrainConfig) -> str:
    """Every key with its value, as YAML that ``load_config`` reads back to the same configuration."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=120)


def changed_values(config: TrainConfig) -> str:
    """``key=value`` for every key that differs from its default, comma-separated."""
    defaults, values = _flatten(config_to_dict(TrainConfig())), _flatten(config_to_dict(config))
    return ", ".join(f"{key}={value}" for key, value in values.items() if defaults.get(key) != value) or "none"


# Keys that only steer a run (how long, how often, how it reports) may change when a phase is resumed; any other
# difference in the resumed phase's section or the model, data, text or fusion sections changes what is trained.
_STEERING_PHASE_KEYS = ("epochs", "checkpoint_every_steps")
_STEERING_KEYS = ("data.num_workers", "data.val_batch_size", "text_encoder.cache_dir")
_STEERING_SECTIONS = ("monitor", "compile_frozen")


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "classes":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def resume_differences(saved: TrainConfig, config: TrainConfig, phase: int) -> tuple[list[str], list[str]]:
    """``(conflicts, changes)``, each ``"key: was → now"``: keys whose change would make a resumed ``phase`` another
    phase, and the keys that only steer it (its length, the reports, the other phases), which may change; a changed
    epoch count of ``phase`` also says what it does to the LR schedule."""
    other_phases = tuple(f"phase{rule.index}." for rule in PHASES if rule.index != phase)
    steering = {f"phase{phase}.{key}" for key in _STEERING_PHASE_KEYS} | set(_STEERING_KEYS)
    before, now = _flatten(config_to_dict(saved)), _flatten(config_to_dict(config))
    conflicts, changes = [], []
    for key in sorted(set(before) | set(now)):
        if before.get(key) == now.get(key):
            continue
        allowed = key in steering or key.startswith(other_phases) or key.split(".")[0] in _STEERING_SECTIONS
        line = f"{key}: {before.get(key)!r} → {now.get(key)!r}"
        if key == f"phase{phase}.epochs":
            line += (
                f" (the LR schedule of phase {phase} now spans {now[key]} epochs instead of {before[key]}: the "
                "remaining steps follow the new warm-up and decay)"
            )
        (changes if allowed else conflicts).append(line)
    return conflicts, changes
