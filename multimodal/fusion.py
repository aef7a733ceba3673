"""Text → image fusion between the DEIMv2 encoder and decoder, and a text-aware score term for the decoder.

Both modules start as exact no-ops: the fused features are added through ``tanh(alpha)`` with ``alpha = 0`` and the
classifier's output is multiplied by a scale that starts at 0. A wrapped, converged detector therefore produces its
own detections at step 0, and training moves away from them only as far as the loss asks.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LevelFusion(nn.Module):
    """One feature level: every visual token cross-attends to the K class tokens; the result is added through a gate.

    ``forward(feat, text)``: ``feat`` B×C×H×W, ``text`` K×D_t → B×C×H×W (same dtype as the attention output).
    """

    def __init__(self, channels: int, text_dim: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"feature channels {channels} are not divisible by num_heads {num_heads}")
        self.text_proj = nn.Linear(text_dim, channels)
        self.text_norm = nn.LayerNorm(channels)
        self.visual_norm = nn.LayerNorm(channels)
        # nn.MultiheadAttention holds the q/k/v input projections and the output projection.
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, feat: Tensor, text: Tensor) -> Tensor:
        B, C, H, W = feat.shape
        tokens = feat.flatten(2).transpose(1, 2)  # (B, H·W, C)
        classes = self.text_norm(self.text_proj(text)).unsqueeze(0).expand(B, -1, -1)  # (B, K, C)
        fused, _ = self.cross_attn(self.visual_norm(tokens), classes, classes, need_weights=False)
        fused = fused.transpose(1, 2).reshape(B, C, H, W)
        # tanh(0) = 0 exactly, so the output equals ``feat`` bit for bit until alpha moves.
        return feat + torch.tanh(self.alpha) * fused


class MultimodalFusionModule(nn.Module):
    """Injects class text embeddings into each level of the encoder's multi-scale features.

    ``forward(feats, text)``: ``feats`` list of B×C_l×H_l×W_l float tensors, fine → coarse, with C_l =
    ``feature_channels[l]``; ``text`` K×D_t class embeddings (``text_dim`` = D_t). Returns a list of the same shapes.
    """

    def __init__(self, feature_channels: Sequence[int], text_dim: int, num_heads: int = 8):
        super().__init__()
        self.levels = nn.ModuleList(LevelFusion(channels, text_dim, num_heads) for channels in feature_channels)

    def forward(self, feats: Sequence[Tensor], text: Tensor) -> list[Tensor]:
        if len(feats) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature levels, got {len(feats)}")
        return [level(feat, text) for level, feat in zip(self.levels, feats, strict=True)]

    def gate_values(self) -> list[float]:
        """tanh(alpha_l) per level, fine → coarse: how much text each level currently receives."""
        return [torch.tanh(level.alpha).item() for level in self.levels]


class TextAwareClassifier(nn.Module):
    """A class-score term from decoder queries: scale · cos(projected query, class embedding).

    ``forward(query_features, text)``: ``query_features`` B×Q×D (decoder layer outputs), ``text`` K×D_t → B×Q×K logits
    to add to the decoder's score heads. ``scale`` starts at 0, so the term is exactly 0 until trained.
    """

    def __init__(self, query_dim: int, text_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, text_dim)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, query_features: Tensor, text: Tensor) -> Tensor:
        queries = F.normalize(self.query_proj(query_features), dim=-1)
        return self.scale * queries @ F.normalize(text, dim=-1).to(queries.dtype).T


def fusion_cost(
    module: MultimodalFusionModule, feature_shapes: Sequence[tuple[int, int, int]], num_classes: int
) -> dict[str, int]:
    """Parameter count and analytic FLOPs per image of ``module`` for ``num_classes`` class tokens.

    ``feature_shapes``: (C, H, W) per level, fine → coarse. FLOPs count 2 per multiply-add of the linear layers and the
    two attention products (text projection, q/k/v/output projections, QKᵀ, AV); layer norms, softmax and the gated add
    are left out. The text-side terms do not depend on the batch and are counted once, as for a batch of one.
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
