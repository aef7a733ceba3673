"""DEIMv2 LiteEncoder (Atto, Femto, Pico): one stride-16 input level, a synthesised stride-32 level, FPN + PAN.

Module tree and state_dict keys follow official DEIMv2 (``input_proj``, ``down_sample1``, ``down_sample2``,
``bi_fusion``, ``fpn_block``, ``pan_block``).
"""

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.encoder.blocks import FusableConvNormLayer, RepNCSPELAN, convert_blocks_to_deploy, get_activation

__all__ = ["LiteEncoder"]


class GAPFusion(nn.Module):
    """Adds the per-channel global mean to every position, then a 1×1 conv + BN + act (``cv``)."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.cv = FusableConvNormLayer(channels, channels, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv(x + x.mean(dim=(2, 3), keepdim=True))


def _avgpool_downsample(channels: int, act: str) -> nn.Sequential:
    # AvgPool2d counts the zero padding (count_include_pad defaults to True), as official DEIMv2 does.
    return nn.Sequential(
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        get_activation(act),
    )


class LiteEncoder(nn.Module):
    """Light encoder of DEIMv2's smallest variants.

    Args:
        in_channels: channels of the single backbone level (one entry).
        feat_strides: its stride (one entry, 16 in every official config); the outputs have strides s and 2s.
        hidden_dim: width D of both outputs.
        expansion, depth_mult: fuse-block size: c4 = round((expansion·D) // 2), round(3·depth_mult) RepVGG blocks
            (Python's banker's rounding, as official DEIMv2 computes them).
        eval_spatial_size: (H, W) eval input size, checked to give an even map at stride s (the stride-2s level is
            upsampled back onto it).

    forward: [float32 B×in_channels×h×w] → [B×D×h×w, B×D×h/2×w/2] (fine → coarse); h and w must be even.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_strides: Sequence[int],
        hidden_dim: int,
        expansion: float,
        depth_mult: float,
        eval_spatial_size: tuple[int, int] | None,
        act: str = "silu",
    ) -> None:
        super().__init__()
        if len(in_channels) != 1 or len(feat_strides) != 1:
            raise ValueError(f"LiteEncoder takes exactly one level, got in_channels {in_channels}")
        stride = feat_strides[0]
        if eval_spatial_size is not None and any(size // stride % 2 for size in eval_spatial_size):
            raise ValueError(
                f"LiteEncoder eval_spatial_size {eval_spatial_size} must give even maps at stride {stride}"
            )
        self.in_channels = list(in_channels)
        self.out_channels = [hidden_dim, hidden_dim]
        self.out_strides = [stride, 2 * stride]

        conv = nn.Conv2d(in_channels[0], hidden_dim, 1, bias=False)
        self.input_proj = nn.ModuleList([nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(hidden_dim)))])
        # Paired modules are deep copies of one instance (identical initial weights), as in official DEIMv2.
        downsample = _avgpool_downsample(hidden_dim, act)
        self.down_sample1 = downsample
        self.down_sample2 = copy.deepcopy(downsample)
        self.bi_fusion = GAPFusion(hidden_dim, act)
        c4 = round((expansion * hidden_dim) // 2)
        fuse_block = RepNCSPELAN(
            hidden_dim, hidden_dim, 2 * hidden_dim, c4, round(3 * depth_mult), trailing_conv=True, act=act
        )
        self.fpn_block = fuse_block
        self.pan_block = copy.deepcopy(fuse_block)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != 1:
            raise ValueError(f"LiteEncoder expects one feature map, got {len(feats)}")
        p16 = self.input_proj[0](feats[0])
        p32 = self.bi_fusion(self.down_sample1(p16))
        out16 = self.fpn_block(p16 + F.interpolate(p32, scale_factor=2.0, mode="nearest"))
        out32 = self.pan_block(p32 + self.down_sample2(out16))
        return [out16, out32]

    def convert_to_deploy(self) -> None:
        """Fold conv+BN pairs and RepVGG branches into single convs (keys ``conv_bn_fused`` / ``conv``); eval only."""
        convert_blocks_to_deploy(self)
