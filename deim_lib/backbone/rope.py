"""Axial rotary position embedding (RoPE) of the DINOv3 family and the self-attention that applies it.

Both ViTs of DEIMv2 (the distilled ViT-Tiny of S/M and the DINOv3 ViT-S/16(+) of L/X) share this definition: base 100,
"separate" coordinate normalisation (rows by the grid height, columns by the grid width) and the rotate-half layout.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RopePositionEmbedding(nn.Module):
    """Sin/cos tables for a grid of patch tokens.

    ``periods[k] = base ** (2k / (head_dim / 2))`` for k < head_dim / 4 is a persistent float32 buffer, because official
    checkpoints store it. A token at row i, column j of an h×w grid has coordinates ``y = 2(i + 0.5)/h − 1`` and
    ``x = 2(j + 0.5)/w − 1``; its angles are ``2π·coord / periods`` laid out as [all y angles, all x angles] and tiled
    twice to length head_dim.

    Args:
        head_dim: per-head width, a multiple of 4.
        base: period base.
        rescale_coords: if given, training-mode calls multiply the coordinates by a factor drawn log-uniformly from
            [1 / rescale_coords, rescale_coords] with the torch RNG (a fresh draw per call). Eval mode never augments.
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: float | None = None) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
        exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", base**exponents, persistent=True)
        self.rescale_coords = rescale_coords

    def forward(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Return ``(sin, cos)``, each float32 of shape (height·width, head_dim), tokens in row-major order."""
        device = self.periods.device
        rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2) as (y, x)
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale_coords is not None:
            log_scale = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=device).uniform_(-log_scale, log_scale).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, head_dim / 4)
        angles = angles.flatten(1).tile(2)  # (HW, head_dim)
        return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    """Split the last dim into halves (u, v) and return (−v, u)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate ``x`` (..., N, head_dim) by the tables ``sin``/``cos`` (N, head_dim)."""
    return x * cos + rotate_half(x) * sin


def apply_rope_to_patches(x: Tensor, sin: Tensor, cos: Tensor, num_prefix_tokens: int) -> Tensor:
    """Rotate the patch tokens of ``x`` (..., N, head_dim) and keep its first ``num_prefix_tokens`` tokens as they are.

    The rotation runs in the tables' dtype (float32) and the result is cast back, so mixed precision keeps it exact.
    """
    prefix, patches = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
    patches = apply_rope(patches.to(sin.dtype), sin, cos).to(x.dtype)
    return torch.cat([prefix, patches], dim=-2)


class MaskedBiasLinear(nn.Linear):
    """Linear layer whose bias is multiplied by the persistent buffer ``bias_mask`` before use.

    DINOv3 uses it for ``qkv`` to switch the key bias off (mask 1 for the q and v thirds, 0 for k). As upstream, the
    mask starts as NaN: its values must come from a checkpoint, and a model that never loaded one outputs NaN.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.register_buffer("bias_mask", torch.full((out_features,), math.nan), persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class RopeAttention(nn.Module):
    """Multi-head self-attention with RoPE on the queries and keys of the patch tokens.

    The first ``num_prefix_tokens`` tokens (cls, storage tokens) are not rotated.

    Args:
        dim: token width E.
        num_heads: number of heads; E / num_heads is the head dim.
        num_prefix_tokens: leading tokens without position.
        mask_k_bias: use :class:`MaskedBiasLinear` for ``qkv`` (DINOv3) instead of a plain biased linear (ViT-Tiny).
    """

    def __init__(self, dim: int, num_heads: int, num_prefix_tokens: int, mask_k_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = MaskedBiasLinear(dim, 3 * dim) if mask_k_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, N, E) with N = prefix + patches; rope: (sin, cos) of shape (patches, head_dim). Returns (B, N, E)."""
        B, N, E = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, E // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,h,N,d)
        q = apply_rope_to_patches(q, *rope, num_prefix_tokens=self.num_prefix_tokens)
        k = apply_rope_to_patches(k, *rope, num_prefix_tokens=self.num_prefix_tokens)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, E))
