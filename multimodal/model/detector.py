"""A DEIMv2 detector with class text embeddings fused between its encoder and its decoder: the one model type of
every phase (phase 0 has no fusion yet) and every tool.

The detector stays a child with the official module tree (``detector.*`` keys are the official ones, except the score
heads once they compute the scores from the text: ``model.class_scores: text``), so its part of the weights can be
saved back as an official checkpoint: ``split_state`` separates it from the fusion weights and ``load_weights`` puts
both back. The text embeddings are one non-persistent buffer (``ClassTexts``) that every text-reading module shares:
they follow ``.to(device)`` but stay out of the state_dict; checkpoints carry ``TextEmbeddings.to_dict()`` beside it,
with the prompts it came from.
"""

from collections.abc import Mapping
from functools import partial

import torch
from torch import Tensor, nn

from deim_lib.checkpoint import CheckpointError
from deim_lib.model import DEIM
from multimodal.model.class_scores import ClassTexts, use_text_scores
from multimodal.model.fusion import LevelFusion, MultimodalFusionModule, TextAwareClassifier

DETECTOR_PREFIX = "detector."
FUSION_PREFIXES = ("fusion.", "text_classifier.")


class MultimodalDetector(nn.Module):
    """DEIMv2 with text fusion: backbone → encoder → ``fusion`` (with the class embeddings) → decoder.

    ``text_embeddings``: float32 [K, D_t], row k describes class k, K = the detector's class count; without them (and
    without ``fusion``) the model is the detector alone, as in phase 0. With a ``text_classifier`` its B×Q'×K output is
    added to every decoder score head. ``forward(images, targets=None)`` takes and returns exactly what
    ``DEIM.forward`` does: B×3×H×W images; eval mode → ``pred_logits`` B×Q×K and ``pred_boxes`` B×Q×4 (normalised
    cxcywh).
    """

    def __init__(
        self,
        detector: DEIM,
        fusion: MultimodalFusionModule | None = None,
        texts: ClassTexts | None = None,
        text_classifier: TextAwareClassifier | None = None,
    ):
        super().__init__()
        if (fusion is None) != (texts is None):
            raise ValueError("a fusion module needs text embeddings, and text embeddings a fusion module")
        if texts is not None and (texts.embeddings.ndim != 2 or texts.embeddings.shape[0] != detector.num_classes):
            raise ValueError(
                f"text embeddings of shape {tuple(texts.embeddings.shape)} do not give one row for each of the "
                f"detector's {detector.num_classes} classes"
            )
        self.detector = detector
        self.fusion = fusion
        self.text_classifier = text_classifier
        self.texts = texts

    @property
    def uses_text(self) -> bool:
        return self.fusion is not None

    @property
    def text_embeddings(self) -> Tensor | None:
        """float32 [K, D_t], row k describing class k; None without text."""
        return self.texts.embeddings if self.texts is not None else None

    @text_embeddings.setter
    def text_embeddings(self, embeddings: Tensor) -> None:
        """Replace the class embeddings of every module that reads them (same shape)."""
        if embeddings.shape != self.texts.embeddings.shape:
            raise ValueError(
                f"text embeddings of shape {tuple(embeddings.shape)} replace {tuple(self.texts.embeddings.shape)}"
            )
        self.texts.embeddings = embeddings

    @property
    def scores_from_text(self) -> bool:
        """Whether the class scores are computed from the text (``model.class_scores: text``)."""
        return not isinstance(self.detector.decoder.enc_score_head, nn.Linear)

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict:
        feats = self.detector.encoder(self.detector.backbone(images))
        if self.fusion is not None:
            feats = self.fusion(feats, self.text_embeddings)
        score_bias = None
        if self.text_classifier is not None:
            score_bias = partial(self.text_classifier, text=self.text_embeddings)
        return self.detector.decoder(feats, targets, score_bias=score_bias)

    @torch.no_grad()
    def to_identity(self) -> "MultimodalDetector":
        """Set the fusion (and text classifier) to the identity in place: the outputs become the detector's own."""
        levels = self.fusion.levels if self.fusion is not None else ()
        for module in (*levels, self.text_classifier):
            if module is not None:
                module.to_identity()
        return self

    def parts(self) -> dict[str, list[nn.Module]]:
        """The modules a training phase freezes or trains, by name: ``decoder`` includes both head groups; ``fusion``
        (the fusion module and the text classifier, if any) exists once the text is attached."""
        decoder = self.detector.decoder
        parts = {
            "backbone": [self.detector.backbone],
            "encoder": [self.detector.encoder],
            "decoder": [decoder],
            "class_heads": [decoder.enc_score_head, decoder.dec_score_head],
            "box_heads": [decoder.enc_bbox_head, decoder.pre_bbox_head, decoder.dec_bbox_head],
        }
        if self.fusion is not None:
            parts["fusion"] = [self.fusion, *([self.text_classifier] if self.text_classifier is not None else [])]
        return parts


def attach_text(
    detector: DEIM,
    text_embeddings: Tensor,
    num_heads: int = 8,
    text_aware_classification: bool = False,
    level: type[nn.Module] = LevelFusion,
    classifier: type[nn.Module] = TextAwareClassifier,
    scores_from_text: bool = False,
    known: Tensor | None = None,
    text_map_rank: int | None = None,
) -> MultimodalDetector:
    """Wrap ``detector`` with a fresh fusion module (identity at init) for ``text_embeddings`` float32 [K, D_t].

    Fusion widths follow the encoder's output channels; ``level`` is the fusion design of one level. With
    ``text_aware_classification`` a ``classifier`` (``classifier(query_dim, text_dim)``) on the decoder's query width
    is added. With ``scores_from_text`` every score head is replaced by one fitted to it that computes the scores from
    the text (``class_scores.use_text_scores``, its shared map of ``text_map_rank``; ``known[j]``: the text row of the
    detector's class j, default the identity), so the detector gets one class per text row. Otherwise the detector's
    weights are used as they are (load them before or after).
    """
    text_dim = text_embeddings.shape[-1]
    texts = ClassTexts(text_embeddings)
    if scores_from_text:
        known = torch.arange(detector.num_classes) if known is None else known
        use_text_scores(detector, texts, known, text_map_rank)
    fusion = MultimodalFusionModule(detector.encoder.out_channels, text_dim, num_heads=num_heads, level=level)
    classifier = classifier(detector.decoder.hidden_dim, text_dim) if text_aware_classification else None
    return MultimodalDetector(detector, fusion, texts.to(text_embeddings.device), classifier)


def split_state(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(detector weights under the official key names, fusion and text-classifier weights) of a model's state_dict.

    Works for a ``MultimodalDetector`` (``detector.*`` keys lose their prefix) and a bare ``DEIM`` (empty second dict).
    """
    detector, fusion = {}, {}
    for key, value in state_dict.items():
        if key.startswith(FUSION_PREFIXES):
            fusion[key] = value
        else:
            detector[key.removeprefix(DETECTOR_PREFIX)] = value
    return detector, fusion


def _check_fit(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str, what: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(given) if expected[key].shape != given[key].shape)
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{source}: the {what} weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shape {reshaped[:3]}); was it written with another variant, class list or fusion setting?"
        )


def load_weights(
    model: MultimodalDetector,
    detector_state: Mapping[str, Tensor] | None,
    fusion_state: Mapping[str, Tensor] | None,
    source: str,
) -> None:
    """Load the halves ``split_state`` wrote, each exactly (no key missing, extra or reshaped); None skips a half.

    Fusion weights for a model without fusion, or keys that do not fit, are a ``CheckpointError`` naming ``source``.
    """
    if detector_state is not None:
        _check_fit(model.detector.state_dict(), detector_state, source, "detector")
        model.detector.load_state_dict(detector_state, strict=True)
    if fusion_state:
        if not model.uses_text:
            raise CheckpointError(f"{source}: holds text-fusion weights, but this phase's model has no text fusion")
        expected = {key: value for key, value in model.state_dict().items() if key.startswith(FUSION_PREFIXES)}
        _check_fit(expected, fusion_state, source, "fusion")
        # Non-strict only because the detector's keys are absent from this half; the fit check above is exact.
        model.load_state_dict(fusion_state, strict=False)
