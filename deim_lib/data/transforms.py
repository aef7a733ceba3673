"""DEIMv2's per-sample augmentation pipeline on torchvision.transforms.v2, with its epoch policy.

Every op is a callable ``op(image, target) -> (image, target)``: torchvision v2 transforms already are; the custom ops
here are plain callables, so nothing depends on torchvision's private transform hooks. Images stay PIL until
``ConvertPILImage`` (photometric ops and resizing must run on PIL to match DEIMv2's pixels). Boxes are
``tv_tensors.BoundingBoxes`` in XYXY pixels until ``BoxesToNormalizedCxcywh`` makes them a plain float32 [N, 4]
tensor of normalised (cx, cy, w, h).

Randomness: Python ``random`` drives Mosaic and the policy draw; torch's RNG drives the torchvision ops and the
IoU-crop gate — seed both for reproducible samples.
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from deim_lib.box_ops import box_xyxy_to_cxcywh

__all__ = [
    "AugmentationRecipe",
    "BoxesToNormalizedCxcywh",
    "ConvertPILImage",
    "DetectionPipeline",
    "GatedRandomIoUCrop",
    "Mosaic",
    "build_train_transforms",
    "build_val_transforms",
]

Sample = tuple[Any, dict[str, Any]]
Op = Callable[[Any, dict[str, Any]], Sample]


@dataclass(frozen=True)
class AugmentationRecipe:
    """One variant's DEIMv2 data recipe: per-sample policy (Mosaic / zoom-out / IoU crop) and batch ops.

    Epoch windows are half-open ``[start, end)``. ``policy_epochs`` = (e0, e1, e2): Mosaic may be drawn in [e0, e1),
    photometric distortion, zoom-out and IoU crop run in [e0, e2). Multi-scale batches run before ``stop_epoch``;
    ``multiscale_base`` None disables them.
    """

    mosaic_output_size: int = 320
    mosaic_prob: float = 0.5
    policy_epochs: tuple[int, int, int] = (4, 64, 120)
    sanitize_min_size: float = 1.0
    mixup_prob: float = 0.5
    mixup_epochs: tuple[int, int] = (4, 64)
    copyblend_prob: float = 0.5
    copyblend_epochs: tuple[int, int] = (4, 120)
    multiscale_base: int | None = 640
    multiscale_repeat: int = 20
    stop_epoch: int = 120


class Mosaic:
    """Four-image mosaic from a cache of recent samples, followed by a random affine warp (DEIMv2's cache mode).

    The current sample (shorter side resized to ``output_size``) joins a cache of at most ``max_cached_images``
    samples; three cache entries are drawn with replacement (Python ``random``; the current sample can be drawn
    again). The four images are pasted on a black canvas of 2·Wmax × 2·Hmax at the quadrant corners, boxes shifted,
    and every target entry concatenated across the four samples (as official DEIMv2 does, so ``image_id``, ``idx`` and
    ``orig_size`` grow too; training never reads them). Boxes after the warp are the clipped hulls of their corners.

    The cache lives in this object, i.e. per DataLoader worker; non-persistent workers start each epoch empty.
    """

    def __init__(self, output_size: int, max_cached_images: int = 50) -> None:
        self.resize = v2.Resize(output_size)
        self.affine = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.5, 1.5), fill=0)
        self.max_cached_images = max_cached_images
        # Entries are never modified in place (later ops return new images and tensors), so no copies are needed.
        self.cache: list[Sample] = []

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> Sample:
        self.cache.append(self.resize(image, target))
        if len(self.cache) > self.max_cached_images:
            self.cache.pop(random.randint(0, len(self.cache) - 2))  # never evict the newest sample
        samples = [self.cache[-1], *random.choices(self.cache, k=3)]
        max_width = max(sample_image.width for sample_image, _ in samples)
        max_height = max(sample_image.height for sample_image, _ in samples)
        canvas = Image.new("RGB", (2 * max_width, 2 * max_height), 0)
        offsets = [(0, 0), (max_width, 0), (0, max_height), (max_width, max_height)]
        shifted = []
        for (sample_image, sample_target), (dx, dy) in zip(samples, offsets, strict=True):
            canvas.paste(sample_image, (dx, dy))
            boxes = sample_target["boxes"].as_subclass(Tensor) + torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
            shifted.append({**sample_target, "boxes": boxes})
        merged = {key: torch.cat([sample_target[key] for sample_target in shifted]) for key in target}
        merged["boxes"] = tv_tensors.BoundingBoxes(merged["boxes"], format="XYXY", canvas_size=canvas.size[::-1])
        return self.affine(canvas, merged)


class GatedRandomIoUCrop:
    """torchvision's SSD-style ``RandomIoUCrop`` run with probability ``p`` (gate drawn from torch's RNG).

    Boxes whose centre leaves the crop become all-zero and must be removed by a following ``SanitizeBoundingBoxes``.
    """

    def __init__(self, p: float = 0.8) -> None:
        self.p = p
        self.crop = v2.RandomIoUCrop(min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0)

    def __call__(self, image: Any, target: dict[str, Any]) -> Sample:
        if torch.rand(1).item() >= self.p:
            return image, target
        return self.crop(image, target)


class ConvertPILImage:
    """PIL RGB → ``tv_tensors.Image`` float32 [3, H, W] in [0, 1]; anything else passes through unchanged."""

    def __call__(self, image: Any, target: dict[str, Any]) -> Sample:
        if isinstance(image, Image.Image):
            image = tv_tensors.Image(TF.pil_to_tensor(image).to(torch.float32).div_(255.0))
        return image, target


class BoxesToNormalizedCxcywh:
    """``target["boxes"]`` XYXY pixels → plain float32 [N, 4] tensor of (cx, cy, w, h) divided by the canvas size."""

    def __call__(self, image: Any, target: dict[str, Any]) -> Sample:
        boxes = target["boxes"]
        height, width = boxes.canvas_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        cxcywh = box_xyxy_to_cxcywh(boxes.as_subclass(Tensor).to(torch.float32)) / scale
        return image, {**target, "boxes": cxcywh}


def _sanitized_target_fields(inputs: Any) -> tuple[Tensor, ...]:
    """Per-box target tensors that SanitizeBoundingBoxes filters together with the boxes."""
    _, target = inputs
    return tuple(target[key] for key in ("labels", "area", "iscrowd") if key in target)


def _sanitize(min_size: float) -> v2.SanitizeBoundingBoxes:
    # Official DEIMv2 filters only "labels", leaving "area"/"iscrowd" longer than "boxes" after a removal; here they
    # are filtered with the boxes on purpose, so that CopyBlend's area threshold reads each box's own area.
    return v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_sanitized_target_fields)


_POLICY_OPS = (Mosaic, v2.RandomPhotometricDistort, v2.RandomZoomOut, GatedRandomIoUCrop)
_SKIPPED_WITH_MOSAIC = (v2.RandomZoomOut, GatedRandomIoUCrop)


class DetectionPipeline:
    """Runs ``ops`` in order on ``(image, target)``; with ``policy_epochs`` it applies DEIMv2's "stop_epoch" policy.

    Policy for a sample at epoch E with (e0, e1, e2) = ``policy_epochs``: ``with_mosaic`` is drawn
    (``random.random() <= mosaic_prob``) only when e0 ≤ E < e1. Mosaic, photometric distortion, zoom-out and the IoU
    crop are skipped when E < e0 or E ≥ e2; Mosaic runs only with ``with_mosaic``; zoom-out and IoU crop never run
    together with Mosaic. Every other op always runs. Without ``policy_epochs`` every op always runs.
    """

    def __init__(
        self, ops: Sequence[Op], policy_epochs: tuple[int, int, int] | None = None, mosaic_prob: float = 0.0
    ) -> None:
        self.ops = list(ops)
        self.policy_epochs = policy_epochs
        self.mosaic_prob = mosaic_prob

    def select_ops(self, epoch: int) -> list[Op]:
        """The ops one sample at ``epoch`` goes through (consumes the policy's Python ``random`` draw)."""
        if self.policy_epochs is None:
            return list(self.ops)
        first, mosaic_end, last = self.policy_epochs
        with_mosaic = first <= epoch < mosaic_end and random.random() <= self.mosaic_prob
        selected = []
        for op in self.ops:
            if isinstance(op, _POLICY_OPS):
                if not first <= epoch < last:
                    continue
                if isinstance(op, Mosaic) and not with_mosaic:
                    continue
                if isinstance(op, _SKIPPED_WITH_MOSAIC) and with_mosaic:
                    continue
            selected.append(op)
        return selected

    def __call__(self, image: Any, target: dict[str, Any], epoch: int = -1) -> Sample:
        for op in self.select_ops(epoch):
            image, target = op(image, target)
        return image, target


def _to_float_ops(normalize: tuple[tuple, tuple] | None) -> list[Op]:
    """PIL → float [0, 1] Image, then (mean, std) normalisation when given."""
    ops: list[Op] = [ConvertPILImage()]
    if normalize is not None:
        mean, std = normalize
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return ops


def build_train_transforms(
    preset: str, image_size: int, normalize: tuple[tuple, tuple] | None, recipe: AugmentationRecipe
) -> DetectionPipeline:
    """Training pipeline called as ``pipeline(pil_image, target, epoch) -> (image, target)``.

    Presets: "deimv2" = Mosaic, photometric distortion, zoom-out, IoU crop (under the epoch policy), sanitize, flip,
    resize, sanitize, to float, normalise, boxes → cxcywh. "finetune" = photometric distortion, flip, resize,
    sanitize, to float, normalise, boxes → cxcywh (no policy, no Mosaic/zoom-out/crop).
    Output: image float32 ``tv_tensors.Image`` [3, S, S] (ImageNet-normalised when ``normalize`` = (mean, std) is
    given); target boxes float32 [N, 4] normalised cxcywh in [0, 1], with labels/area/iscrowd filtered alike.
    """
    convert_boxes = BoxesToNormalizedCxcywh()
    sanitize = _sanitize(recipe.sanitize_min_size)
    if preset == "deimv2":
        ops = [
            Mosaic(recipe.mosaic_output_size),
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=0),
            GatedRandomIoUCrop(p=0.8),
            sanitize,
            v2.RandomHorizontalFlip(),
            v2.Resize([image_size, image_size]),
            sanitize,
            *_to_float_ops(normalize),
            convert_boxes,
        ]
        return DetectionPipeline(ops, policy_epochs=recipe.policy_epochs, mosaic_prob=recipe.mosaic_prob)
    if preset == "finetune":
        ops = [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomHorizontalFlip(),
            v2.Resize([image_size, image_size]),
            sanitize,
            *_to_float_ops(normalize),
            convert_boxes,
        ]
        return DetectionPipeline(ops)
    raise ValueError(f"unknown augmentation preset {preset!r}; choose 'deimv2' or 'finetune'")


def build_val_transforms(image_size: int, normalize: tuple[tuple, tuple] | None) -> DetectionPipeline:
    """Evaluation pipeline: resize to S×S (PIL bilinear), float [0, 1], optional normalisation.

    As in official DEIMv2, boxes stay ``BoundingBoxes`` XYXY in pixels of the resized canvas; evaluation maps
    predictions back with ``orig_size`` and matches them by ``image_id``.
    """
    return DetectionPipeline([v2.Resize([image_size, image_size]), *_to_float_ops(normalize)])
