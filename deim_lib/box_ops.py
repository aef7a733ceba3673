"""Box conversions and overlaps with DEIMv2's exact conventions.

Formats: ``cxcywh`` = (centre x, centre y, width, height), ``xyxy`` = (x1, y1, x2, y2); both are normalised to [0, 1]
unless a caller says otherwise. Overlaps come from torchvision; only the conversions that differ from torchvision's
(widths clamped at zero) and the logit helper live here.
"""

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "generalized_box_iou", "inverse_sigmoid"]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """cxcywh → xyxy with negative widths/heights clamped to zero, so a degenerate prediction stays a valid box."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w = 0.5 * w.clamp(min=0.0)
    half_h = 0.5 * h.clamp(min=0.0)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` after clipping to [0, 1]; ``eps`` keeps 0 and 1 finite."""
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))
