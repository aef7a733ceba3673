"""Multi-scale deformable cross-attention as used by DEIMv2's decoder (no value or output projection)."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformableAttention", "split_value"]


def split_value(memory: Tensor, spatial_shapes: Sequence[tuple[int, int]], num_heads: int) -> list[Tensor]:
    """Cut the flattened multi-level memory into per-level, per-head value maps.

    Args:
        memory: B×Σ×D float, levels concatenated fine → coarse, each level flattened row-major.
        spatial_shapes: (h_l, w_l) per level with Σ = Σ_l h_l·w_l.
        num_heads: head h owns channels [h·D/heads, (h+1)·D/heads).

    Returns:
        one (B·heads)×(D/heads)×h_l×w_l tensor per level.
    """
    B, _, D = memory.shape
    head_dim = D // num_heads
    value = memory.reshape(B, -1, num_heads, head_dim).permute(0, 2, 3, 1)
    sizes = [h * w for h, w in spatial_shapes]
    return [
        v.reshape(B * num_heads, head_dim, h, w)
        for v, (h, w) in zip(value.split(sizes, dim=-1), spatial_shapes, strict=True)
    ]


class MSDeformableAttention(nn.Module):
    """Each query samples a few points per level around its reference box and averages them with learned weights.

    The softmax over the attention weights runs jointly over all points of all levels (per head), and offsets are
    scaled by ``1 / num_points[l]`` and by half the reference box size, as official DEIMv2 does.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_points: Sequence[int], offset_scale: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_points = list(num_points)
        self.offset_scale = offset_scale
        total_points = sum(self.num_points)
        scale = [1.0 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total_points)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Zero weights: every query starts by sampling a fixed star pattern; head h looks in direction 2πh/heads and
        # the k-th point of a level sits k steps out, so the points cover rings of growing radius.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])
        bias = direction[:, None, :] * steps[None, :, None]  # heads × P × 2
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: list[Tensor], spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Sample and mix the value maps around each query's reference box.

        Args:
            query: B×Q×D float (content + positional embedding).
            reference_points: B×Q×1×4 reference boxes, cxcywh normalised.
            value: per-level maps from :func:`split_value`.
            spatial_shapes: (h_l, w_l) per level.

        Returns:
            B×Q×D float, heads outer and channels inner (no output projection).
        """
        B, Q, _ = query.shape
        P = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(B, Q, self.num_heads, P, 2)
        weights = F.softmax(self.attention_weights(query).reshape(B, Q, self.num_heads, P), dim=-1)
        points_scale = self.num_points_scale.to(query.dtype)[:, None]
        offsets = offsets * points_scale * reference_points[:, :, None, :, 2:] * self.offset_scale
        locations = reference_points[:, :, None, :, :2] + offsets  # B×Q×heads×P×2
        # grid_sample wants (B·heads)×Q×points×2 in [-1, 1].
        grids = (2 * locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1)
        sampled = [
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
            for value_l, grid_l in zip(value, grids.split(self.num_points, dim=-2), strict=True)
        ]  # each (B·heads)×(D/heads)×Q×n_l
        weights = weights.permute(0, 2, 1, 3).reshape(B * self.num_heads, 1, Q, P)
        out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B·heads)×(D/heads)×Q
        return out.reshape(B, -1, Q).permute(0, 2, 1)
