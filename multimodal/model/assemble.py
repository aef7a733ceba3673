"""Weights + what to build → a ready ``MultimodalDetector``: the one place every entry point assembles its model.

``assemble_model`` serves the training script (a start point and the run's config); ``checkpoint_model`` serves the
tools (``predict``, ``export``, ``interpolate``), which rebuild a phase checkpoint from what it stored. Both build the
detector, load its weights, add the classes the weights lack (``model.new_classes``), attach the text fusion when
there is text (with score heads that compute the scores from it: ``model.class_scores: text``), and load the fusion's
weights, in that order.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deim_lib.checkpoint import checkpoint_num_classes, load_detector_state
from deim_lib.errors import CheckpointError
from deim_lib.model import build_detector
from deim_lib.variants import Variant, get_variant
from multimodal.config import ConfigError, FusionConfig, stored_section
from multimodal.model.class_scores import ClassTexts, add_random_rows, add_text_rows, fit_residual
from multimodal.model.detector import MultimodalDetector, attach_text, load_weights
from multimodal.model.fusion import LevelFusion, TextAwareClassifier
from multimodal.model.text_encoder import TextEmbeddings


@dataclass(frozen=True)
class FusionDesigns:
    """The fusion design of one feature level and the text-aware classifier that phase 1 builds (experiments compare
    others: experiments/fusion_designs.py)."""

    level: type[nn.Module] = LevelFusion
    classifier: type[nn.Module] = TextAwareClassifier


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``text`` (one row per class, in ``class_names`` order) attaches the fusion; None builds the
    detector alone (phase 0)."""

    variant: Variant
    class_names: list[str]
    image_size: int
    text: TextEmbeddings | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    designs: FusionDesigns = field(default_factory=FusionDesigns)
    class_scores: str = "linear"  # or "text" (model.class_scores)
    text_map_rank: int | None = None  # the text score heads' shared map: its rank, None for full (model.text_map_rank)
    new_classes: str = "none"  # or "text", "random" (model.new_classes)
    sync_batchnorm: bool = False  # several CUDA processes: BatchNorm statistics over all of them (official sync_bn)


@dataclass(frozen=True)
class Weights:
    """What to load: ``detector`` (official key names) and ``fusion`` halves, None to keep the fresh ones.

    ``class_names``: the classes ``detector`` was trained on, when the file says (official files do not).
    ``reinit_class_heads``: a detector of another class count loads with fresh class heads. ``backbone``: official
    backbone weights for a fresh detector (phase 0 from scratch).
    """

    source: str
    detector: dict[str, Tensor] | None = None
    fusion: dict[str, Tensor] | None = None
    class_names: list[str] | None = None
    reinit_class_heads: bool = False
    backbone: str | None = None


@dataclass(frozen=True)
class AssembledModel:
    model: MultimodalDetector
    reinitialised: list[str]  # detector keys left at their fresh initialisation (a new class count)
    constants: frozenset[int]  # ids of the parameters built non-trainable (``train.freezing.constant_parameters``)
    added: list[str]  # the classes the weights lacked, added by model.new_classes
    notes: list[str]  # what the log should say about how the classes were matched


TEXT_SCORE_KEY = "decoder.enc_score_head.text_map.weight"  # present in weights whose heads score from the text
REDUCE_KEY = "decoder.enc_score_head.reduce.weight"  # and, when their shared map has a rank, its [rank, hidden] factor


def _known_classes(spec: ModelSpec, weights: Weights) -> tuple[list[str], list[str]]:
    """(the weights' classes, notes): their stored names, or for a file without names (official DEIMv2) the first K
    of the dataset's classes, K the weights' class count."""
    if weights.detector is None:
        return list(spec.class_names), []
    if weights.class_names is not None:
        return list(weights.class_names), []
    if TEXT_SCORE_KEY in weights.detector:
        return list(spec.class_names), []
    held = checkpoint_num_classes(weights.detector)
    if held >= len(spec.class_names) or spec.new_classes == "none":
        return list(spec.class_names), []
    names = list(spec.class_names[:held])
    return names, [
        f"{weights.source} stores no class names: its {held} classes are taken to be the dataset's first {held} "
        f"categories in category-id order ({', '.join(names[:3])}, …, {names[-1]})"
    ]


def assemble_model(spec: ModelSpec, weights: Weights) -> AssembledModel:
    """The model of ``spec`` with ``weights``; classes that do not match, or weights that do not fit, are one-line
    errors naming ``weights.source`` and the fix."""
    names = list(spec.class_names)
    known_names, notes = _known_classes(spec, weights)
    added = [name for name in names if name not in known_names]
    if known_names != names and (spec.new_classes == "none" or any(name not in names for name in known_names)):
        fix = "data.* must describe the classes the checkpoint was trained on"
        if spec.new_classes == "none" and all(name in names for name in known_names):
            fix = "to add the dataset's other classes set model.new_classes: text (or random)"
        raise ConfigError(f"{weights.source}: its classes {known_names} differ from the dataset's {names}; {fix}")
    text_form = weights.detector is not None and TEXT_SCORE_KEY in weights.detector
    if text_form and (spec.class_scores != "text" or spec.text is None):
        fix = "set model.class_scores: text" if spec.text is not None else "use it in a phase with text (1-3)"
        raise ConfigError(f"{weights.source}: its class scores are computed from the text; {fix}")
    # A checkpoint of this package with these very classes and score heads describes this model exactly: it loads
    # once the model is assembled. Official files, and weights that get classes added or text score heads fitted, go
    # through DEIMv2's loader first.
    scores_from_text = spec.class_scores == "text" and spec.text is not None  # phase 0 has no text: linear heads
    same_heads = text_form == scores_from_text
    exact = weights.detector is not None and weights.class_names is not None and not added and same_heads
    if added and text_form:
        raise ConfigError(
            f"{weights.source}: adding classes to weights whose scores already come from the text is not supported; "
            "add them when starting from the linear-head checkpoint (an official file or a phase-0/1 checkpoint)"
        )
    if spec.text is None and added and spec.new_classes == "text":
        raise ConfigError(
            "model.new_classes: text composes the new classes from their descriptions, which phase 0 does not use; "
            "add them from phase 1 on, or use model.new_classes: random"
        )
    known = torch.tensor([names.index(name) for name in known_names])
    size = (spec.image_size, spec.image_size)
    detector = build_detector(spec.variant.name, len(known_names), eval_size=size)
    reinitialised = []
    if weights.detector is not None and not exact:
        reinitialised = load_detector_state(detector, weights.detector, weights.source, weights.reinit_class_heads)
    elif weights.backbone:
        detector.backbone.load_pretrained(weights.backbone)
    if added and spec.new_classes == "random":
        add_random_rows(detector, known, len(names))
    if added and spec.new_classes == "text" and spec.class_scores == "linear":
        add_text_rows(detector, ClassTexts(spec.text.embeddings), known)
    if spec.sync_batchnorm:
        detector = nn.SyncBatchNorm.convert_sync_batchnorm(detector)
    if spec.text is None:
        model = MultimodalDetector(detector)
    else:
        if list(spec.text.class_names) != names:
            raise CheckpointError(f"{weights.source}: its text embeddings describe other classes than its detector's")
        model = attach_text(
            detector,
            spec.text.embeddings,
            spec.fusion.num_heads,
            spec.fusion.text_aware_classification,
            level=spec.designs.level,
            classifier=spec.designs.classifier,
            scores_from_text=scores_from_text,
            known=known,
            text_map_rank=spec.text_map_rank,
        )
    residual = fit_residual(model.detector)
    if scores_from_text and not text_form and residual > 1e-4:
        notes.append(
            f"the text score heads were fitted to the trained ones by least squares with a relative residual of "
            f"{residual:.2g} (the class texts do not span the classes exactly, e.g. more classes than the text width, "
            "or model.text_map_rank is below their count − 1): "
            "the scores start close to the detector's, not equal"
        )
    load_weights(model, weights.detector if exact else None, weights.fusion, weights.source)
    # Taken before any phase freezes anything: the parameters DEIMv2 builds non-trainable stay so in every phase.
    constants = frozenset(id(p) for p in model.parameters() if not p.requires_grad)
    return AssembledModel(model, reinitialised, constants, added, notes)


def checkpoint_spec(checkpoint, path: str | Path) -> ModelSpec:
    """How a phase checkpoint's run built its model: the detector, and from phase 1 on the text fusion with its
    embeddings as a constant (and score heads that read them, when its run computed the scores from the text)."""
    info = checkpoint.info
    detector_state, fusion_state = checkpoint.weights()
    if fusion_state and "num_heads" not in info.config.get("fusion", {}):
        # The head count shapes no weight: a default would load without complaint and compute something else.
        raise CheckpointError(f"{path}: its config has no fusion.num_heads (not written by train_progressive.py?)")
    try:
        fusion = stored_section(info.config, "fusion")
    except (ConfigError, AttributeError) as error:
        raise CheckpointError(f"{path}: its stored config does not fit this version ({error})") from None
    text = None
    if fusion_state:
        if checkpoint.text_embeddings is None:
            raise CheckpointError(f"{path}: has text-fusion weights but no text embeddings to rebuild the fusion with")
        text = TextEmbeddings.from_dict(checkpoint.text_embeddings)
        # The classifier's presence is read from the weights: they decide which modules must exist.
        text_aware = any(key.startswith("text_classifier.") for key in fusion_state)
        fusion = FusionConfig(num_heads=fusion.num_heads, text_aware_classification=text_aware)
    return ModelSpec(
        variant=get_variant(info.variant),
        class_names=list(info.class_names),
        image_size=info.image_size,
        text=text,
        fusion=fusion,
        # As for the classifier, the weights say which score heads must exist.
        class_scores="text" if TEXT_SCORE_KEY in detector_state else "linear",
        text_map_rank=detector_state[REDUCE_KEY].shape[0] if REDUCE_KEY in detector_state else None,
    )


def checkpoint_model(checkpoint, path: str | Path) -> MultimodalDetector:
    """A phase checkpoint's model (``checkpoint_spec``) with the weights it was evaluated with (EMA when present)."""
    detector_state, fusion_state = checkpoint.weights()
    weights = Weights(str(path), detector_state, fusion_state, class_names=list(checkpoint.info.class_names))
    return assemble_model(checkpoint_spec(checkpoint, path), weights).model
