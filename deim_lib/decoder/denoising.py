"""Contrastive denoising queries for DEIMv2 training (noised copies of the ground truth)."""

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from deim_lib.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["DenoisingGroup", "contrastive_denoising_group", "denoising_attn_mask"]


class DenoisingGroup(NamedTuple):
    """Denoising queries to prepend to the matching queries.

    content: B×T×D embedded noisy labels; ref_points_unact: B×T×4 logit-space cxcywh noisy boxes;
    attn_mask: (T+Q)×(T+Q) bool, True = blocked; dn_meta: {dn_positive_idx: tuple of per-image int64 [G·n_b] query
    indices, dn_num_group: G, dn_num_split: [T, Q]}.
    """

    content: Tensor
    ref_points_unact: Tensor
    attn_mask: Tensor
    dn_meta: dict[str, Any]


def denoising_attn_mask(group_size: int, num_groups: int, num_queries: int, device: torch.device) -> Tensor:
    """(T+Q)×(T+Q) bool mask, True = blocked, with T = group_size·num_groups.

    Matching queries must not see any denoising query (they would read the answers); each denoising group sees only
    itself and the matching queries.
    """
    num_dn = group_size * num_groups
    group = torch.arange(num_dn + num_queries, device=device) // group_size
    is_dn = group < num_groups
    other_group = group[:, None] != group[None, :]
    return is_dn[None, :] & (other_group | ~is_dn[:, None])


def _padded_targets(targets: list[dict[str, Tensor]], num_classes: int, max_gt: int) -> tuple[Tensor, Tensor, Tensor]:
    """Labels (int32, padding = num_classes), cxcywh boxes (padding = 0) and the real-box mask, each B×max_gt[…]."""
    device = targets[0]["labels"].device
    batch = len(targets)
    labels = torch.full((batch, max_gt), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros((batch, max_gt, 4), device=device)
    real = torch.zeros((batch, max_gt), dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        labels[i, :n] = target["labels"]
        boxes[i, :n] = target["boxes"]
        real[i, :n] = True
    return labels, boxes, real


def contrastive_denoising_group(
    targets: list[dict[str, Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroup | None:
    """Build G groups of [M positive, M negative] noisy copies of each image's ground truth (M = max GT count).

    Positives get box noise below half the box size and are trained to reconstruct their GT; negatives get noise in
    [1, 2)× that size and are trained as background. A quarter of the real labels (``label_noise_ratio / 2``) are
    replaced by random classes. RNG draws (torch, targets' device): rand, randint, randint, rand.

    Args:
        targets: per image ``labels`` int64 [n] and ``boxes`` float [n, 4] cxcywh normalised.
        class_embed: (num_classes + 1)×D embedding whose last row is the zero padding row.

    Returns:
        the group, or None when no image has a box (or ``num_denoising`` is 0).
    """
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts, default=0)
    if num_denoising <= 0 or max_gt == 0:
        return None
    num_groups = max(num_denoising // max_gt, 1)
    labels, boxes, real = _padded_targets(targets, num_classes, max_gt)
    labels = labels.tile(1, 2 * num_groups)
    boxes = boxes.tile(1, 2 * num_groups, 1)
    real = real.tile(1, 2 * num_groups)
    device = boxes.device
    slot = torch.arange(2 * max_gt * num_groups, device=device)
    negative = ((slot // max_gt) % 2 == 1)[None, :, None].to(boxes.dtype)  # 1×T×1
    # Positive slots of image b: the first n_b slots of every group, in increasing order.
    dn_positive_idx = tuple(
        (torch.arange(num_groups, device=device)[:, None] * 2 * max_gt + torch.arange(n, device=device)).flatten()
        for n in num_gts
    )

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & real, random_labels, labels)

    ref_points_unact = inverse_sigmoid(boxes)
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_size = (boxes[..., 2:] * 0.5).tile(1, 1, 2) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative  # [0, 1) for positives, [1, 2) for negatives
        corners = (corners + sign * magnitude * half_size).clip(min=0.0, max=1.0)
        # Clipping can flip an edge pair; the official code negates such negative widths/heights.
        ref_points_unact = inverse_sigmoid(box_xyxy_to_cxcywh(corners).abs())

    num_dn = 2 * max_gt * num_groups
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_groups, "dn_num_split": [num_dn, num_queries]}
    attn_mask = denoising_attn_mask(2 * max_gt, num_groups, num_queries, device)
    return DenoisingGroup(class_embed(labels), ref_points_unact, attn_mask, dn_meta)
