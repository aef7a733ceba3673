"""Text → image fusion between the DEIMv2 encoder and decoder, and a text-aware score term for the decoder.

Both start as exact no-ops and can open at the optimiser's pace (``docs/fusion_design.md`` has the measurements):

- ``LevelFusion``: every visual token cross-attends to the K class tokens and adds the result. The values are centred
  over the classes, so attention that does not tell the classes apart adds nothing (text that is the same for every
  class cannot shift the features); the output projection starts at zero, so the first AdamW step already moves a
  whole matrix (not one scalar gate, which AdamW moves by about ``lr`` per step). Its output is scaled by 1/√C so that
  the added signal grows by about ``lr`` relative to a unit input per step, whatever the width.
- ``TextAwareClassifier``: a bilinear score ⟨W·query, t_k − t̄⟩ / √D per class k with W = 0 at the start, added to
  every decoder score head.
"""

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _centred(text: Tensor) -> Tensor:
    """Class embeddings minus their mean row: what distinguishes the classes."""
    return text - text.mean(dim=0, keepdim=True)


def in_float32(device_type: str):
    """Autocast off: the fused signal is a small difference of nearly equal terms (class rows minus their mean, near
    uniform attention) that bf16 cannot resolve; under bf16 the fusion's first gradient was 88 % off float32's."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


class LevelFusion(nn.Module):
    """One feature level: ``forward(feat, text)`` with ``feat`` B×C×H×W and ``text`` K×D_t → B×C×H×W.

    Returns ``feat + added``; ``added`` is exactly 0 until ``output`` has trained (it starts at zero).
    """

    def __init__(self, channels: int, text_dim: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"feature channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.text_proj = nn.Linear(text_dim, channels)
        self.text_norm = nn.LayerNorm(channels)
        self.visual_norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels, bias=False)  # no bias: centred inputs give centred values
        self.output = nn.Linear(channels, channels, bias=False)
        self.output_scale = 1.0 / math.sqrt(channels)
        self.to_identity()

    def to_identity(self) -> None:
        """Zero the output projection: the level then adds exactly nothing (its start, and WiSE-FT's weight 0)."""
        nn.init.zeros_(self.output.weight)

    def forward(self, feat: Tensor, text: Tensor) -> Tensor:
        """``added`` is computed in float32 under any autocast, then added in ``feat``'s dtype: a zero ``added`` returns
        ``feat`` itself, bit for bit, in any precision."""
        B, C, H, W = feat.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        with in_float32(feat.device.type):
            tokens = self.visual_norm(feat.float().flatten(2).transpose(1, 2))  # (B, H·W, C)
            classes = self.text_norm(self.text_proj(text.float()))  # (K, C)
            q = self.query(tokens).view(B, -1, heads, head_dim).transpose(1, 2)  # (B, h, H·W, d)
            k = self.key(classes).view(1, -1, heads, head_dim).transpose(1, 2).expand(B, -1, -1, -1)  # (B, h, K, d)
            v = self.value(_centred(classes)).view(1, -1, heads, head_dim).transpose(1, 2).expand(B, -1, -1, -1)
            attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
            added = (self.output_scale * self.output(attended)).transpose(1, 2).reshape(B, C, H, W)
        return feat + added.to(feat.dtype)


class MultimodalFusionModule(nn.Module):
    """Injects class text embeddings into each level of the encoder's multi-scale features.

    ``forward(feats, text)``: ``feats`` list of B×C_l×H_l×W_l float tensors, fine → coarse, with C_l =
    ``feature_channels[l]``; ``text`` K×D_t class embeddings (``text_dim`` = D_t). Returns a list of the same shapes.
    """

    def __init__(
        self, feature_channels: Sequence[int], text_dim: int, num_heads: int = 8, level: type[nn.Module] = LevelFusion
    ):
        """``level``: the fusion design of one level, built as ``level(channels, text_dim, num_heads)``; it must start
        as the identity and provide ``to_identity()`` (``LevelFusion`` is this package's design)."""
        super().__init__()
        self.levels = nn.ModuleList(level(channels, text_dim, num_heads) for channels in feature_channels)

    def forward(self, feats: Sequence[Tensor], text: Tensor) -> list[Tensor]:
        if len(feats) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature levels, got {len(feats)}")
        return [level(feat, text) for level, feat in zip(self.levels, feats, strict=True)]


class TextAwareClassifier(nn.Module):
    """A class-score term from decoder queries: ⟨W·query, t_k − t̄⟩ / √D for every class k, W = 0 at the start.

    ``forward(query_features, text)``: ``query_features`` B×Q×D (decoder layer outputs), ``text`` K×D_t → B×Q×K
    logits to add to the decoder's score heads. Permuting the text rows permutes the term: it is where the
    correspondence between a class and its description enters the scores.
    """

    def __init__(self, query_dim: int, text_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, text_dim, bias=False)
        self.output_scale = 1.0 / math.sqrt(query_dim)
        self.to_identity()

    def to_identity(self) -> None:
        """Zero the projection: the score term is then exactly 0."""
        nn.init.zeros_(self.query_proj.weight)

    def forward(self, query_features: Tensor, text: Tensor) -> Tensor:
        """In float32 under any autocast (the centred text rows are small differences); returns float32."""
        with in_float32(query_features.device.type):
            projected = self.query_proj(query_features.float())
            return self.output_scale * projected @ _centred(text.float()).T


def fusion_cost(
    module: MultimodalFusionModule, feature_shapes: Sequence[tuple[int, int, int]], num_classes: int
) -> dict[str, int]:
    """Parameter count and analytic FLOPs per image of ``module`` for ``num_classes`` class tokens.

    ``feature_shapes``: (C, H, W) per level, fine → coarse. FLOPs count 2 per multiply-add of the linear layers and the
    two attention products (text projection, q/k/v/output projections, QKᵀ, AV); layer norms, softmax and the add are
    left out. The text-side terms do not depend on the batch and are counted once, as for a batch of one.
    """
    if len(feature_shapes) != len(module.levels):
        raise ValueError(f"expected {len(module.levels)} feature shapes, got {len(feature_shapes)}")
    K = num_classes
    macs = 0
    for level, (C, H, W) in zip(module.levels, feature_shapes, strict=True):
        channels = level.text_proj.out_features
        if channels != C:
            raise ValueError(f"feature shape {(C, H, W)} does not match the level's {channels} channels")
        N = H * W
        text_side = K * level.text_proj.in_features * C + 2 * K * C * C  # text projection, keys, values
        visual_side = 2 * N * C * C + 2 * N * K * C  # queries and output projection, QKᵀ and AV
        macs += text_side + visual_side
    return {"params": sum(p.numel() for p in module.parameters()), "flops": 2 * macs}
