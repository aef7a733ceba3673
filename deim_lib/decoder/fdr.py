"""Fine-grained distribution refinement (FDR) maths shared by the decoder and the criterion.

A box edge is predicted as a distribution over ``reg_max + 1`` bins whose bin centres are the non-uniform weighting
function W. The expected value of that distribution is an edge offset measured in units of ``ref_size / reg_scale``
around a reference box. ``bbox2distance`` is the inverse mapping that turns ground-truth boxes into fractional bin
targets for the FGL loss.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from deim_lib.box_ops import box_xyxy_to_cxcywh

__all__ = ["bbox2distance", "deploy_weighting_function", "distance2bbox", "integral", "weighting_function"]


def weighting_function(reg_max: int, up: Tensor, reg_scale: Tensor) -> Tensor:
    """Bin centres W of the edge distributions, differentiable in ``up``.

    Args:
        reg_max: number of bins minus one (R, 32 in DEIMv2).
        up: float tensor [1], the upper-bound factor (0.5).
        reg_scale: tensor [1] (int64 or float), the curvature/scale factor (4 or 8).

    Returns:
        float tensor [R+1] (dtype of ``up``): ``[-2b, -(step^k - 1) ..., 0, ... step^k - 1, 2b]`` with ``b = |up||s|``
        and ``step = (b + 1)^(2/(R-2))``, so W is dense near zero and the inner values stop at ``±b``.
    """
    half_bound = (up.abs() * reg_scale.abs()).reshape(1)
    full_bound = half_bound * 2
    step = (half_bound + 1) ** (2 / (reg_max - 2))
    exponents = torch.arange(1, reg_max // 2, device=up.device, dtype=up.dtype)
    right = step**exponents - 1
    zero = torch.zeros_like(up[:1])
    return torch.cat([-full_bound, -right.flip(0), zero, right, full_bound])


def deploy_weighting_function(reg_max: int, up: float, reg_scale: float, dtype: torch.dtype) -> Tensor:
    """W computed in Python floats, as official DEIMv2 stores it for deployment (may differ from the training W by
    one ulp). Returns a CPU tensor [R+1] of ``dtype``."""
    half_bound = abs(up) * abs(reg_scale)
    step = (half_bound + 1) ** (2 / (reg_max - 2))
    right = [step**k - 1 for k in range(1, reg_max // 2)]
    values = [-2 * half_bound, *(-v for v in reversed(right)), 0.0, *right, 2 * half_bound]
    return torch.tensor(values, dtype=dtype)


def integral(pred_corners: Tensor, project: Tensor) -> Tensor:
    """Expected edge offsets of the corner distributions.

    Args:
        pred_corners: [..., 4 * (R+1)] logits, edge-major (left, top, right, bottom).
        project: [R+1] bin centres W.

    Returns:
        [..., 4] expected offsets ``Σ_n softmax(logits)_n · W_n`` per edge.
    """
    prob = F.softmax(pred_corners.reshape(*pred_corners.shape[:-1], 4, project.numel()), dim=-1)
    return F.linear(prob, project[None]).squeeze(-1)


def distance2bbox(points: Tensor, distance: Tensor, reg_scale: Tensor) -> Tensor:
    """Decode edge offsets around reference boxes.

    Args:
        points: [..., 4] reference boxes, cxcywh normalised.
        distance: [..., 4] offsets (left, top, right, bottom) in units of ``size / reg_scale``, relative to the
            reference box's own half-size ``0.5 · reg_scale``.
        reg_scale: scalar or [1] tensor.

    Returns:
        [..., 4] boxes, cxcywh normalised. Widths/heights are not clamped and can become negative.
    """
    reg_scale = reg_scale.abs()
    unit_w = points[..., 2] / reg_scale
    unit_h = points[..., 3] / reg_scale
    x1 = points[..., 0] - (0.5 * reg_scale + distance[..., 0]) * unit_w
    y1 = points[..., 1] - (0.5 * reg_scale + distance[..., 1]) * unit_h
    x2 = points[..., 0] + (0.5 * reg_scale + distance[..., 2]) * unit_w
    y2 = points[..., 1] + (0.5 * reg_scale + distance[..., 3]) * unit_h
    return box_xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], dim=-1))


def _bin_targets(offsets: Tensor, reg_max: int, project: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fractional left-bin index and the two interpolation weights for each offset (flattened)."""
    offsets = offsets.reshape(-1)
    left_bin = (project[None, :] <= offsets[:, None]).sum(dim=1) - 1
    below = left_bin < 0
    above = left_bin >= reg_max
    inside_bin = left_bin.clamp(0, reg_max - 1)
    dist_left = (offsets - project[inside_bin]).abs()
    dist_right = (project[inside_bin + 1] - offsets).abs()
    weight_right = dist_left / (dist_left + dist_right)
    weight_right = torch.where(below, torch.zeros_like(weight_right), weight_right)
    weight_right = torch.where(above, torch.ones_like(weight_right), weight_right)
    weight_left = torch.where(above, torch.zeros_like(weight_right), 1.0 - weight_right)
    weight_left = torch.where(below, torch.ones_like(weight_left), weight_left)
    index = left_bin.to(offsets.dtype)
    index = torch.where(below, torch.zeros_like(index), index)
    index = torch.where(above, torch.full_like(index, reg_max - 0.1), index)
    return index, weight_right, weight_left


@torch.no_grad()
def bbox2distance(
    points: Tensor, bbox: Tensor, reg_max: int, reg_scale: Tensor, up: Tensor, eps: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """FGL targets: ground-truth edges as fractional bins of W around the reference boxes (inverse of distance2bbox).

    Args:
        points: [N, 4] reference boxes, cxcywh normalised.
        bbox: [N, 4] ground-truth boxes, xyxy normalised.
        reg_max: R; reg_scale, up: the decoder's parameters ([1] tensors).
        eps: the fractional index is clamped to ``[0, R - eps]`` so that ``floor + 1`` stays a valid bin.

    Returns:
        target_corners [N*4] float (fractional bin index, edge-major per box), weight_right [N*4], weight_left [N*4];
        all detached. The CE targets are ``floor(target)`` (weight_left) and ``floor(target) + 1`` (weight_right).
    """
    reg_scale = reg_scale.abs()
    # 1e-16 keeps degenerate (zero-size) references finite.
    unit_w = points[:, 2] / reg_scale + 1e-16
    unit_h = points[:, 3] / reg_scale + 1e-16
    left = (points[:, 0] - bbox[:, 0]) / unit_w - 0.5 * reg_scale
    top = (points[:, 1] - bbox[:, 1]) / unit_h - 0.5 * reg_scale
    right = (bbox[:, 2] - points[:, 0]) / unit_w - 0.5 * reg_scale
    bottom = (bbox[:, 3] - points[:, 1]) / unit_h - 0.5 * reg_scale
    offsets = torch.stack([left, top, right, bottom], dim=-1)
    index, weight_right, weight_left = _bin_targets(offsets, reg_max, weighting_function(reg_max, up, reg_scale))
    return index.clamp(min=0, max=reg_max - eps), weight_right, weight_left
