"""ViT-Tiny / ViT-Tiny+, the DINOv3-distilled semantic backbones of DEIMv2-S and -M.

A plain pre-norm ViT: cls token + patch tokens, RoPE computed once per forward (no coordinate augmentation), no storage
tokens, no LayerScale, no final norm. The weights live under the attribute ``_model`` so that state-dict keys read
``_model.*`` as in official checkpoints and the distilled ``vitt*_distill.pt`` files.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deim_lib.backbone.dinov3_vit import Block, Mlp, PatchEmbed
from deim_lib.backbone.rope import RopePositionEmbedding


class ViTTinyWeights(nn.Module):
    """Parameter container of :class:`ViTTiny` (key order: cls_token, patch_embed, blocks, rope_embed)."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int, patch_size: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, Mlp(embed_dim, 4 * embed_dim), num_prefix_tokens=1, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, base=100.0)


class ViTTiny(nn.Module):
    """ViT-Tiny giving the raw (un-normalised) patch tokens of selected blocks.

    Args:
        embed_dim: token width E (192 for ViT-Tiny, 256 for ViT-Tiny+).
        num_heads: heads (3 / 4, head dim 64).
        depth: number of blocks.
        patch_size: patch side in pixels.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        depth: int = 12,
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self._model = ViTTinyWeights(embed_dim, num_heads, depth, patch_size)

    def get_intermediate_layers(self, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Raw patch tokens (cls dropped, row-major) after the blocks in ``layers`` (0-based, increasing).

        x: (B, 3, H, W) float, H and W multiples of the patch size. Returns one (B, (H/p)·(W/p), E) tensor per layer.
        """
        model = self._model
        B = x.shape[0]
        rope = model.rope_embed(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = torch.cat([model.cls_token.expand(B, -1, -1), model.patch_embed(x)], dim=1)
        outputs = []
        for i, block in enumerate(model.blocks):
            tokens = block(tokens, rope)
            if i in layers:
                outputs.append(tokens[:, 1:])
        return outputs
