"""DEIMv2 HybridEncoder: per-level input projection, a transformer layer on the coarsest level, then FPN + PAN fusion.

Module tree and state_dict keys follow official DEIMv2 (``input_proj``, ``encoder``, ``lateral_convs``, ``fpn_blocks``,
``downsample_convs``, ``pan_blocks``).
"""

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.encoder.blocks import (
    FusableConvNormLayer,
    RepNCSPELAN,
    SCDown,
    TransformerEncoder,
    TransformerEncoderLayer,
    convert_blocks_to_deploy,
)

__all__ = ["HybridEncoder", "build_2d_sincos_position_embedding"]

# version → whether the fuse blocks end each CSP stack with a 3×3 conv (RepNCSPELAN4) or not (RepNCSPELAN5).
_FUSE_BLOCK_TRAILING_CONV = {"dfine": True, "deim": False}


def build_2d_sincos_position_embedding(width: int, height: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos embedding, float32 [1, width·height, dim], for a row-major flattened map.

    For token n the embedding is [sin(a·ω), cos(a·ω), sin(b·ω), cos(b·ω)] with a = n // height, b = n % height and
    ω_k = temperature^(−k/(dim/4)). Official DEIMv2 indexes a width×height grid this way; on the square maps used in
    practice a is the row and b the column.
    """
    if dim % 4 != 0:
        raise ValueError(f"position embedding dimension {dim} must be divisible by 4")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    n = torch.arange(width * height)
    a = (n // height).to(torch.float32)[:, None] * omega[None]
    b = (n % height).to(torch.float32)[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]


def _eval_pos_embed_name(level: int) -> str:
    return f"eval_pos_embed_{level}"


def _input_projection(in_channels: int, hidden_dim: int) -> nn.Module:
    if in_channels == hidden_dim:
        return nn.Identity()
    conv = nn.Conv2d(in_channels, hidden_dim, 1, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(hidden_dim)))


class HybridEncoder(nn.Module):
    """Hybrid encoder of DEIMv2 (DINOv3 variants and HGNetv2 N/S/M/L/X).

    Args:
        in_channels: channels of each backbone level, fine → coarse.
        feat_strides: stride of each level (e.g. 8, 16, 32).
        hidden_dim: width D of every output level.
        dim_feedforward: hidden width of the transformer layer's MLP.
        expansion, depth_mult: fuse-block size: c4 = round((expansion·D) // 2) channels, round(3·depth_mult) RepVGG
            blocks per CSP stack (Python's banker's rounding, as official DEIMv2 computes them).
        version: "deim" → RepNCSPELAN5 fuse blocks, "dfine" → RepNCSPELAN4.
        eval_spatial_size: (H, W) input size in eval mode; the positional embedding is precomputed for it.
        use_encoder_idx: levels that get the transformer layer (default: the last level).

    forward: list of float32 B×in_channels[i]×H_i×W_i maps → list of B×D×H_i×W_i maps (same levels, fine → coarse).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_strides: Sequence[int],
        hidden_dim: int,
        dim_feedforward: int,
        expansion: float,
        depth_mult: float,
        version: str,
        eval_spatial_size: tuple[int, int] | None,
        nhead: int = 8,
        num_encoder_layers: int = 1,
        use_encoder_idx: Sequence[int] | None = None,
        pe_temperature: float = 10000.0,
        enc_act: str = "gelu",
        act: str = "silu",
    ) -> None:
        super().__init__()
        if version not in _FUSE_BLOCK_TRAILING_CONV:
            raise ValueError(
                f"unknown HybridEncoder version {version!r}; expected one of {sorted(_FUSE_BLOCK_TRAILING_CONV)}"
            )
        if len(in_channels) != len(feat_strides) or len(in_channels) < 2:
            raise ValueError(f"HybridEncoder needs ≥ 2 levels with one stride each, got {in_channels}, {feat_strides}")
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = [len(in_channels) - 1] if use_encoder_idx is None else list(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList([_input_projection(c, hidden_dim) for c in in_channels])
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, enc_act)
        self.encoder = nn.ModuleList(
            [TransformerEncoder(copy.deepcopy(layer), num_encoder_layers) for _ in self.use_encoder_idx]
        )

        # Every copy of a block starts from the same weights, as in official DEIMv2.
        num_fusions = len(in_channels) - 1
        c4 = round((expansion * hidden_dim) // 2)
        fuse_block = RepNCSPELAN(
            hidden_dim,
            hidden_dim,
            2 * hidden_dim,
            c4,
            round(3 * depth_mult),
            trailing_conv=_FUSE_BLOCK_TRAILING_CONV[version],
            act=act,
        )
        lateral = FusableConvNormLayer(hidden_dim, hidden_dim, 1)
        downsample = nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2))
        self.lateral_convs = nn.ModuleList([copy.deepcopy(lateral) for _ in range(num_fusions)])
        self.fpn_blocks = nn.ModuleList([copy.deepcopy(fuse_block) for _ in range(num_fusions)])
        self.downsample_convs = nn.ModuleList([copy.deepcopy(downsample) for _ in range(num_fusions)])
        self.pan_blocks = nn.ModuleList([copy.deepcopy(fuse_block) for _ in range(num_fusions)])

        # Non-persistent buffers: official checkpoints have no key for them, but .to(device) moves them once, so an
        # eval forward (frozen encoder in phases 1–3, evaluation) copies nothing from the host.
        if eval_spatial_size is not None:
            for idx in self.use_encoder_idx:
                stride = self.feat_strides[idx]
                w, h = eval_spatial_size[1] // stride, eval_spatial_size[0] // stride
                table = build_2d_sincos_position_embedding(w, h, hidden_dim, pe_temperature)
                self.register_buffer(_eval_pos_embed_name(idx), table, persistent=False)

    def _position_embedding(self, level: int, height: int, width: int, like: Tensor) -> Tensor:
        # Eval at eval_spatial_size reuses the cached table; training (multi-scale) recomputes it for the batch size.
        if self.training or self.eval_spatial_size is None:
            pos = build_2d_sincos_position_embedding(width, height, self.hidden_dim, self.pe_temperature)
        else:
            pos = getattr(self, _eval_pos_embed_name(level))
            if pos.shape[1] != height * width:
                raise ValueError(
                    f"HybridEncoder in eval mode expects inputs of eval_spatial_size {self.eval_spatial_size}; "
                    f"got a {height}×{width} map at stride {self.feat_strides[level]}"
                )
        return pos.to(device=like.device, dtype=like.dtype)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [project(feat) for project, feat in zip(self.input_proj, feats, strict=True)]

        for encoder, level in zip(self.encoder, self.use_encoder_idx, strict=True):
            B, D, H, W = proj[level].shape
            tokens = proj[level].flatten(2).permute(0, 2, 1)  # (B, H·W, D), row-major
            memory = encoder(tokens, pos_embed=self._position_embedding(level, H, W, tokens))
            proj[level] = memory.permute(0, 2, 1).reshape(B, D, H, W).contiguous()

        # Top-down: the lateral output of each coarse level is both upsampled into the finer level and kept for the
        # bottom-up pass (the PAN adds these lateral outputs, not the FPN block outputs).
        coarse = proj[-1]
        laterals: list[Tensor] = []
        for k, fine in enumerate(reversed(proj[:-1])):
            lateral = self.lateral_convs[k](coarse)
            laterals.insert(0, lateral)
            coarse = self.fpn_blocks[k](F.interpolate(lateral, scale_factor=2.0, mode="nearest") + fine)

        outs = [coarse]
        for k, lateral in enumerate(laterals):
            outs.append(self.pan_blocks[k](self.downsample_convs[k](outs[-1]) + lateral))
        return outs

    def convert_to_deploy(self) -> None:
        """Fold conv+BN pairs and RepVGG branches into single convs (keys ``conv_bn_fused`` / ``conv``); eval only."""
        convert_blocks_to_deploy(self)
