"""DINOv3 ViT-S/16 and ViT-S+/16, the semantic backbones of DEIMv2-L and -X, plus the block parts ViT-Tiny reuses.

Key names follow the official DINOv3 checkpoints (``cls_token``, ``storage_tokens``, ``mask_token``,
``patch_embed.proj``, ``rope_embed.periods``, ``blocks.{i}.{norm1,attn,ls1,norm2,mlp,ls2}``, ``norm``), so the
released ``dinov3_vits16*_pretrain_lvd1689m`` files load strictly.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.backbone.rope import RopeAttention, RopePositionEmbedding

FeedForward = Literal["mlp", "swiglu"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) → (B, (H/p)·(W/p), E) tokens in row-major order."""

    def __init__(self, embed_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel learned scale ``gamma`` applied to a residual branch."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 → GELU (exact) → fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(silu(w1 x) ⊙ w2 x)``; the hidden width is 2/3 of the requested one, rounded up to a multiple of 8."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        hidden = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x ← x + ls1(attn(norm1 x)); x ← x + ls2(mlp(norm2 x)).

    Without ``layer_scale_init`` the ls1/ls2 branches are identities and produce no state-dict keys (ViT-Tiny).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: nn.Module,
        num_prefix_tokens: int,
        norm_eps: float,
        layer_scale_init: float | None = None,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RopeAttention(dim, num_heads, num_prefix_tokens, mask_k_bias=mask_k_bias)
        self.ls1 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp
        self.ls2 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: (B, N, E); rope: (sin, cos) for the patch tokens. Returns (B, N, E)."""
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv3ViT(nn.Module):
    """DINOv3 ViT with storage tokens, LayerScale, a masked key bias and per-block RoPE.

    Token sequence: [cls, storage tokens, patch tokens]. RoPE tables are recomputed for every block; in training mode
    each block therefore draws its own coordinate rescale (12 draws per forward), as official DINOv3 does.

    Args:
        embed_dim, depth, num_heads: ViT size.
        ffn: "mlp" (GELU MLP, keys fc1/fc2) or "swiglu" (keys w1/w2/w3).
        ffn_ratio: FFN hidden width / embed_dim before SwiGLU's 2/3 reduction.
        num_storage_tokens: register tokens after cls.
        patch_size: patch side in pixels.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        ffn: FeedForward = "mlp",
        ffn_ratio: float = 4.0,
        num_storage_tokens: int = 4,
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_prefix_tokens = 1 + num_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, num_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, base=100.0, rescale_coords=2.0)
        ffn_class = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn_class(embed_dim, int(embed_dim * ffn_ratio)),
                self.num_prefix_tokens,
                norm_eps=1e-5,
                layer_scale_init=1e-5,
                mask_k_bias=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def get_intermediate_layers(self, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Patch tokens after the final norm of the blocks in ``layers`` (0-based, increasing).

        x: (B, 3, H, W) float, H and W multiples of the patch size. Returns one (B, (H/p)·(W/p), E) tensor per layer.
        All blocks run (the trailing ones are part of the model) even if the last requested layer is earlier.
        """
        B = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        cls = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph, as upstream
        tokens = torch.cat(
            [cls.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), self.patch_embed(x)],
            dim=1,
        )
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, self.rope_embed(h, w))
            if i in layers:
                outputs.append(self.norm(tokens[:, self.num_prefix_tokens :]))
        return outputs


DINOV3_PRESETS: dict[str, dict] = {
    "dinov3_vits16": {"embed_dim": 384, "num_heads": 6, "ffn": "mlp", "ffn_ratio": 4.0},
    "dinov3_vits16plus": {"embed_dim": 384, "num_heads": 6, "ffn": "swiglu", "ffn_ratio": 6.0},
}
