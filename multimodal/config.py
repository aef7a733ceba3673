"""Typed training configuration: frozen dataclasses, one strict loader for YAML files and ``--set key.sub=value``.

Precedence: dataclass defaults < YAML < ``--set``. An unknown key is an error naming the closest valid key; a value of
the wrong type is an error naming the key and the expected type. YAML holds values only; structure lives in Python.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PART_NAMES = ("backbone", "encoder", "decoder", "class_heads", "box_heads", "fusion")


class ConfigError(ValueError):
    """A configuration problem; the message names the file or key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "atto"
    image_size: int | None = None  # None: the variant's input size (needed to load official checkpoints)
    weights: str | None = None  # official DEIMv2 checkpoint used as the phase-1 base when --init is not given
    reinit_class_heads: bool = False  # allow a checkpoint with another class count (its class heads start fresh)
    pretrained_backbone: str | None = None  # official backbone weights for training phase 0 from scratch


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
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"  # an open_clip tag, a local weights file, or null for random weights
    templates: list[str] = field(default_factory=lambda: ["{}"])
    precomputed: str | None = None  # a [K, D] .npy/.pt file of class embeddings used instead of the text model
    cache_dir: str | None = None  # None: <output_dir>/text_cache


@dataclass(frozen=True)
class FusionConfig:
    num_heads: int = 8
    text_aware_classification: bool = False


@dataclass(frozen=True)
class PhaseConfig:
    trainable: list[str] = field(default_factory=list)
    lr: float | None = 2e-4  # None: the variant's DEIMv2 base LR (phase 0's default)
    epochs: int = 12
    warmup_iters: int = 100
    scheduler: str = "cosine"  # "cosine" or "flatcosine"
    flat_fraction: float = 0.5  # flatcosine: fraction of the iterations kept at the base lr
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    augmentation: str = "finetune"  # "finetune" or "deimv2"
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmups: int = 1000
    grad_clip: float = 0.1
    amp: bool = True  # bf16 autocast on CUDA; always float32 on CPU
    checkpoint_every_steps: int = 0  # 0: only at epoch ends


@dataclass(frozen=True)
class MonitorConfig:
    max_ap_drop: float = 0.05  # largest tolerated AP drop below the base detector
    on_drop: str = "warn"  # "warn" or "stop" (stop ends the phase; the best checkpoint is kept)
    max_nonfinite_steps: int = 20  # this many non-finite losses in a row stop the run
    best_metric: str = "AP"  # "AP" or "AP50": what phaseN_best.pth maximises


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    phase0: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(
            trainable=["backbone", "encoder", "decoder"], lr=None, epochs=72, augmentation="deimv2"
        )
    )
    phase1: PhaseConfig = field(default_factory=lambda: PhaseConfig(trainable=["fusion"], lr=2e-4))
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(trainable=["fusion", "class_heads"], lr=5e-5))
    phase3: PhaseConfig = field(default_factory=lambda: PhaseConfig(trainable=["fusion", "decoder"], lr=2e-5))
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
            raise ConfigError(f"{key}: expected a list, got {value!r}")
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
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    *parents, leaf = key.strip().split(".")
    values = dict(values)
    node = values
    for part in parents:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[leaf] = yaml.safe_load(text) if text.strip() else ""
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The validated configuration from an optional YAML file and ``--set`` assignments."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    for assignment in overrides:
        values = _assign(values, assignment)
    try:
        config = _build(TrainConfig, values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks that span several fields; each failure names the key and the fix."""
    for index in range(4):
        phase = config.phase(index)
        for part in phase.trainable:
            if part not in PART_NAMES:
                raise ConfigError(f"phase{index}.trainable: unknown part {part!r}; choose from {', '.join(PART_NAMES)}")
        if phase.scheduler not in ("cosine", "flatcosine"):
            raise ConfigError(f"phase{index}.scheduler: {phase.scheduler!r} is not 'cosine' or 'flatcosine'")
        if phase.augmentation not in ("finetune", "deimv2"):
            raise ConfigError(f"phase{index}.augmentation: {phase.augmentation!r} is not 'finetune' or 'deimv2'")
        if (phase.lr is not None and phase.lr <= 0) or phase.epochs < 1:
            raise ConfigError(f"phase{index}: lr must be > 0 and epochs ≥ 1 (got lr {phase.lr}, epochs {phase.epochs})")
        if index > 0 and "backbone" in phase.trainable and not config.allow_backbone_training:
            raise ConfigError(
                f"phase{index}.trainable includes 'backbone', the stability anchor of progressive fine-tuning; "
                "remove it, or set allow_backbone_training: true to train it deliberately"
            )
    if "fusion" in config.phase0.trainable:
        raise ConfigError("phase0.trainable: phase 0 trains the detector without text; remove 'fusion'")
    if config.monitor.best_metric not in ("AP", "AP50"):
        raise ConfigError(f"monitor.best_metric: {config.monitor.best_metric!r} is not 'AP' or 'AP50'")
    if config.monitor.on_drop not in ("warn", "stop"):
        raise ConfigError(f"monitor.on_drop: {config.monitor.on_drop!r} is not 'warn' or 'stop'")
    if config.model.image_size is not None and config.model.image_size % 32:
        raise ConfigError(f"model.image_size: {config.model.image_size} must be a multiple of 32")
    if config.data.batch_size < 1 or config.data.val_batch_size < 1:
        raise ConfigError("data.batch_size and data.val_batch_size must be at least 1")


def config_to_dict(config: TrainConfig) -> dict:
    """Plain data (dicts, lists, numbers, strings) for checkpoints loaded with ``weights_only=True``."""
    return dataclasses.asdict(config)
