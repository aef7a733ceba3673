"""Batch collation with DEIMv2's batch-level augmentation: MixUp, CopyBlend and multi-scale resizing.

Inputs are the per-sample outputs of the training pipeline: float images [3, S, S] and targets whose ``boxes`` are
normalised (cx, cy, w, h) float32 [N, 4]. All randomness here comes from Python ``random``.
"""

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deim_lib.data.transforms import AugmentationRecipe

__all__ = ["BatchImageCollate", "copy_blend", "mixup", "multiscale_sizes"]

Target = dict[str, Any]
# Per-object target entries: batch ops that add objects extend all of these together.
_OBJECT_KEYS = ("boxes", "labels", "area", "iscrowd")


def multiscale_sizes(base: int, repeat: int) -> list[int]:
    """DEIMv2's training sizes: multiples of 32 from ~0.75·base up, ``repeat`` copies of base, down from ~1.25·base.

    For (640, 20): [480, 512, 544, 576, 608] + [640]·20 + [800, 768, 736, 704, 672].
    """
    low = int(0.75 * base / 32) * 32
    high = int(1.25 * base / 32) * 32
    steps = (base - low) // 32
    return [low + 32 * i for i in range(steps)] + [base] * repeat + [high - 32 * i for i in range(steps)]


def _draw_beta() -> float:
    return round(random.uniform(0.45, 0.55), 6)


def _extend(target: Target, extra: dict[str, Tensor]) -> Target:
    """A copy of ``target`` whose per-object entries continue with the rows of ``extra`` (target dtypes kept)."""
    extended = dict(target)
    for key, rows in extra.items():
        if key in target:
            extended[key] = torch.cat([target[key], rows.to(target[key].dtype)])
    return extended


def mixup(images: Tensor, targets: Sequence[Target], beta: float) -> tuple[Tensor, list[Target]]:
    """Blend image i with image i−1 (the first with the last): β·x_i + (1−β)·x_{i−1}; boxes of both are kept.

    images: float [B, 3, H, W]. Target i gets its own objects followed by those of target i−1.
    """
    mixed = images * beta + images.roll(shifts=1, dims=0) * (1.0 - beta)
    mixed_targets = []
    for i, target in enumerate(targets):
        previous = targets[i - 1]  # i = 0 pairs with the last target, like roll
        mixed_targets.append(_extend(target, {key: previous[key] for key in _OBJECT_KEYS if key in previous}))
    return mixed, mixed_targets


def _paste_object(
    canvas: Tensor, source: Tensor, box: Tensor, beta: float, expand_range: tuple[float, float]
) -> Tensor | None:
    """Blend the object ``box`` (normalised cxcywh) of ``source`` [3, H, W] into a random spot of ``canvas`` in place.

    The pasted rectangle is enlarged by a random fraction of its size on each side (limited so that it stays inside
    the image at both the source and the destination). Returns the destination box (normalised cxcywh, without the
    enlargement) or None when the box covers no whole pixel.
    """
    _, height, width = canvas.shape
    cx, cy, w, h = box.tolist()
    x1, y1 = max(int((cx - w / 2) * width), 0), max(int((cy - h / 2) * height), 0)
    x2, y2 = min(int((cx + w / 2) * width), width), min(int((cy + h / 2) * height), height)
    box_width, box_height = x2 - x1, y2 - y1
    if box_width <= 0 or box_height <= 0:
        return None
    dest_x, dest_y = random.randint(0, width - box_width), random.randint(0, height - box_height)
    ratio = round(random.uniform(*expand_range), 6)
    grow_x, grow_y = int(box_width * ratio), int(box_height * ratio)
    left = min(grow_x, x1, dest_x)
    right = min(grow_x, width - x2, width - dest_x - box_width)
    top = min(grow_y, y1, dest_y)
    bottom = min(grow_y, height - y2, height - dest_y - box_height)
    patch = source[:, y1 - top : y2 + bottom, x1 - left : x2 + right]
    region = canvas[:, dest_y - top : dest_y + box_height + bottom, dest_x - left : dest_x + box_width + right]
    region.mul_(beta).add_(patch, alpha=1.0 - beta)
    return torch.tensor(
        [(dest_x + box_width / 2) / width, (dest_y + box_height / 2) / height, box_width / width, box_height / height]
    )


def copy_blend(
    images: Tensor,
    targets: Sequence[Target],
    beta: float,
    num_objects: int = 3,
    area_threshold: float = 100.0,
    expand_range: tuple[float, float] = (0.1, 0.25),
) -> tuple[Tensor, list[Target]]:
    """DEIMv2's CopyBlend: blend up to ``num_objects`` objects of the batch into each image as new objects.

    The pool is every object of the batch with ``area`` ≥ ``area_threshold``; each image draws
    min(num_objects, pool size) distinct pool entries. Pasted pixels are β·destination + (1−β)·source, the source
    read from the unmodified batch. images: float [B, 3, H, W]; targets' boxes normalised cxcywh. Returns new images
    and targets with the pasted boxes, labels and areas appended (iscrowd 0).
    """
    pool = [
        (i, j)
        for i, target in enumerate(targets)
        for j, area in enumerate(target["area"].tolist())
        if area >= area_threshold
    ]
    if not pool:
        return images, list(targets)
    blended = images.clone()
    new_targets = []
    for i, target in enumerate(targets):
        extra: dict[str, list[Tensor]] = {key: [] for key in _OBJECT_KEYS}
        for source_index, object_index in random.sample(pool, min(num_objects, len(pool))):
            source_target = targets[source_index]
            source_box = source_target["boxes"][object_index]
            pasted = _paste_object(blended[i], images[source_index], source_box, beta, expand_range)
            if pasted is None:
                continue
            extra["boxes"].append(pasted)
            extra["labels"].append(source_target["labels"][object_index])
            extra["area"].append(source_target["area"][object_index])
            extra["iscrowd"].append(torch.zeros((), dtype=torch.int64))
        if extra["boxes"]:
            target = _extend(target, {key: torch.stack(rows) for key, rows in extra.items()})
        new_targets.append(target)
    return blended, new_targets


class BatchImageCollate:
    """DataLoader ``collate_fn``: stacks images to float [B, 3, S, S], keeps targets as a list of dicts.

    With a ``recipe`` (training), per batch at epoch E: MixUp with ``mixup_prob`` inside ``mixup_epochs``, else
    CopyBlend with ``copyblend_prob`` inside ``copyblend_epochs``; then, while E < ``stop_epoch``, the batch is
    resized (nearest) to a size drawn from ``multiscale_sizes(base, recipe.multiscale_repeat)``, where base is
    ``base_size`` if given, else ``recipe.multiscale_base`` (None: no multi-scale). Boxes are normalised, so
    resizing leaves them unchanged. ``recipe`` None (validation) only stacks.
    """

    def __init__(self, recipe: AugmentationRecipe | None = None, base_size: int | None = None) -> None:
        self.recipe = recipe
        self.epoch = -1
        base = base_size if base_size is not None else (recipe.multiscale_base if recipe is not None else None)
        use_scales = recipe is not None and base is not None
        self.scales = multiscale_sizes(base, recipe.multiscale_repeat) if use_scales else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
        images = torch.stack([image.as_subclass(Tensor) for image, _ in batch])
        targets = [target for _, target in batch]
        if self.recipe is None:
            return images, targets
        images, targets = self._mix(images, targets, self.recipe)
        if self.scales is not None and self.epoch < self.recipe.stop_epoch:
            images = F.interpolate(images, size=random.choice(self.scales))  # nearest, as official DEIMv2
        return images, targets

    def _mix(self, images: Tensor, targets: list[Target], recipe: AugmentationRecipe) -> tuple[Tensor, list[Target]]:
        # The first β is drawn every batch and reused by CopyBlend; MixUp draws its own (official RNG order).
        beta = _draw_beta()
        if random.random() < recipe.mixup_prob and recipe.mixup_epochs[0] <= self.epoch < recipe.mixup_epochs[1]:
            return mixup(images, targets, _draw_beta())
        start, end = recipe.copyblend_epochs
        if start <= self.epoch < end and random.random() < recipe.copyblend_prob:
            return copy_blend(images, targets, beta)
        return images, targets
