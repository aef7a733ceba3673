"""Is the text used? Two measurements of a multimodal detector that say so whatever its weights look like.

- **Added signal**: per fusion level, ‖fused − features‖ / ‖features‖ over an evaluation pass (0: the fusion is the
  identity), and the RMS of the text-aware classifier's score bias in logit units.
- **Text reliance**: the AP lost when evaluation runs again with the class embeddings permuted across classes (a fixed
  derangement: which text belongs to which class) and with every row replaced by the mean row (the text's content).
  A fresh fusion gives exactly 0 for both.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from deim_lib.evaluate import evaluate_detector
from deim_lib.postprocessor import PostProcessor
from multimodal.model.detector import MultimodalDetector

DERANGEMENT_SEED = 0


class AddedSignal:
    """Forward hooks on the fusion levels (and the text classifier) of ``model`` while the ``with`` block runs."""

    def __init__(self, model: MultimodalDetector):
        self.model = model
        self.levels = [[0.0, 0.0] for _ in model.fusion.levels]  # per level: Σ‖added‖², Σ‖features‖²
        self.bias = [0.0, 0]  # Σ bias², element count
        self._handles = []

    def _level_hook(self, index: int):
        def hook(module, inputs, output):
            features = inputs[0].detach().float()
            self.levels[index][0] += (output.detach().float() - features).square().sum().item()
            self.levels[index][1] += features.square().sum().item()

        return hook

    def _bias_hook(self, module, inputs, output):
        self.bias[0] += output.detach().float().square().sum().item()
        self.bias[1] += output.numel()

    def __enter__(self) -> "AddedSignal":
        self._handles = [
            level.register_forward_hook(self._level_hook(index)) for index, level in enumerate(self.model.fusion.levels)
        ]
        if self.model.text_classifier is not None:
            self._handles.append(self.model.text_classifier.register_forward_hook(self._bias_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def ratios(self) -> list[float]:
        """‖added‖ / ‖features‖ per level, fine → coarse, over everything seen inside the block."""
        return [math.sqrt(added / features) if features > 0 else 0.0 for added, features in self.levels]

    def classifier_bias_rms(self) -> float | None:
        if self.model.text_classifier is None or not self.bias[1]:
            return None
        return math.sqrt(self.bias[0] / self.bias[1])


def derangement(count: int, seed: int = DERANGEMENT_SEED) -> Tensor:
    """A fixed permutation of ``range(count)`` that moves every index (count ≥ 2), drawn from a seeded generator."""
    if count < 2:
        raise ValueError("a derangement needs at least 2 classes")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        if not (order == torch.arange(count)).any():
            return order


@contextmanager
def replaced_text(model: MultimodalDetector, embeddings: Tensor) -> Iterator[None]:
    """``model`` runs with ``embeddings`` [K, D] as its class embeddings inside the block, then gets its own back."""
    original = model.text_embeddings
    model.text_embeddings = embeddings.to(original.device, original.dtype)
    try:
        yield
    finally:
        model.text_embeddings = original


def text_reliance(model: MultimodalDetector, ap: float, evaluate_ap: Callable[[], float]) -> dict[str, float]:
    """AP(real) − AP(permuted) and AP(real) − AP(mean); ``ap`` is AP(real), ``evaluate_ap()`` evaluates ``model``."""
    text = model.text_embeddings
    permuted = text[derangement(len(text))]
    mean = F.normalize(text.mean(dim=0, keepdim=True), dim=-1).expand_as(text)  # unit norm, like every real row
    results = {}
    for name, embeddings in (("permuted", permuted), ("mean", mean)):
        with replaced_text(model, embeddings):
            results[f"AP_{name}"] = evaluate_ap()
        results[name] = ap - results[f"AP_{name}"]
    return results


def evaluate_with_text(model, evaluate_coco: Callable[[], dict], reliance: bool = False) -> dict:
    """``evaluate_coco()`` (COCO metrics of ``model``) plus ``text``: for a multimodal model the added signal per level,
    the classifier's bias and, with ``reliance``, the text reliance (two more evaluation passes); {} without text."""
    if not model.uses_text:
        return evaluate_coco() | {"text": {}}
    with AddedSignal(model) as signal:
        metrics = evaluate_coco()
    text = {"added_signal": signal.ratios(), "classifier_bias": signal.classifier_bias_rms()}
    if reliance:
        text["reliance"] = text_reliance(model, metrics["AP"], lambda: evaluate_coco()["AP"])
    return metrics | {"text": text}


def evaluate_model(model, dataset, loader, device: torch.device, reliance: bool = False, progress: bool = True) -> dict:
    """COCO metrics of ``model`` on ``dataset`` (a ``CocoDetection``, batched by ``loader``) plus ``text``
    (``evaluate_with_text``): the added signal and, with ``reliance``, the text reliance."""

    def coco() -> dict:
        postprocessor = PostProcessor(len(dataset.class_names))
        return evaluate_detector(
            model, postprocessor, loader, device, dataset.category_ids, dataset.coco, progress=progress
        )[0]

    return evaluate_with_text(model, coco, reliance)
