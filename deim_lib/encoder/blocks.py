"""Convolutional building blocks shared by DEIMv2's HybridEncoder and LiteEncoder (official module and key names).

All blocks map float32 B×C×H×W feature maps to B×C'×H'×W' maps. Blocks that can be folded for inference expose
``convert_to_deploy()`` (idempotent); ``convert_blocks_to_deploy`` applies it to a whole encoder.
"""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CSPLayer2",
    "ConvNormLayer",
    "FusableConvNormLayer",
    "RepNCSPELAN",
    "SCDown",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "VGGBlock",
    "convert_blocks_to_deploy",
    "get_activation",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def get_activation(name: str | None) -> nn.Module:
    """Activation module by name (``None`` → Identity); ReLU and SiLU run in place, as in official DEIMv2."""
    if name is None:
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    if name == "gelu":
        return nn.GELU()
    return _ACTIVATIONS[name](inplace=True)


def _fold_batchnorm(conv_weight: Tensor, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of a bias-free conv followed by eval-mode ``norm``: (W·γ/σ, β − μ·γ/σ), σ = √(var + eps)."""
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    return conv_weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


class ConvNormLayer(nn.Module):
    """Bias-free conv (padding (k−1)//2) → BatchNorm2d → optional activation. Keys ``conv.weight``, ``norm.*``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: str | None = None,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class FusableConvNormLayer(ConvNormLayer):
    """ConvNormLayer that folds into one biased conv ``conv_bn_fused`` for deployment (official ConvNormLayer_fuse)."""

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "conv_bn_fused"):
            return self.act(self.conv_bn_fused(x))
        return super().forward(x)

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        if hasattr(self, "conv_bn_fused"):
            return
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups
        ).to(conv.weight.device, conv.weight.dtype)
        kernel, bias = _fold_batchnorm(conv.weight, self.norm)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.conv_bn_fused = fused
        del self.conv, self.norm


class VGGBlock(nn.Module):
    """RepVGG block: act(BN(conv3×3(x)) + BN(conv1×1(x))); deploy folds both branches into one 3×3 conv ``conv``."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(in_channels, out_channels, 3)
        self.conv2 = ConvNormLayer(in_channels, out_channels, 1)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        if hasattr(self, "conv"):
            return
        kernel3, bias3 = _fold_batchnorm(self.conv1.conv.weight, self.conv1.norm)
        kernel1, bias1 = _fold_batchnorm(self.conv2.conv.weight, self.conv2.norm)
        weight = self.conv1.conv.weight
        fused = nn.Conv2d(weight.shape[1], weight.shape[0], 3, 1, padding=1).to(weight.device, weight.dtype)
        # A 1×1 kernel is the centre of a zero 3×3 kernel, so the two branches add up to one 3×3 conv.
        fused.weight.copy_(kernel3 + F.pad(kernel1, [1, 1, 1, 1]))
        fused.bias.copy_(bias3 + bias1)
        self.conv = fused
        del self.conv1, self.conv2


class CSPLayer2(nn.Module):
    """1×1 conv to 2·C_out, split in halves (a, b), return a + VGG-bottlenecks(b) (C_out channels)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, act: str = "silu") -> None:
        super().__init__()
        self.conv1 = FusableConvNormLayer(in_channels, 2 * out_channels, 1, act=act)
        self.bottlenecks = nn.Sequential(*[VGGBlock(out_channels, out_channels, act) for _ in range(num_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv1(x).chunk(2, dim=1)
        return a + self.bottlenecks(b)


class RepNCSPELAN(nn.Module):
    """ELAN fuse block: RepNCSPELAN4 with ``trailing_conv`` (a 3×3 conv after each CSP stack), RepNCSPELAN5 without.

    ``cv1`` maps c1 → c3 and splits it into halves y0, y1; y2 = cv2(y1), y3 = cv3(y2) (c4 channels each);
    ``cv4`` maps concat[y0, y1, y2, y3] (c3 + 2·c4) → c2.
    """

    def __init__(
        self, c1: int, c2: int, c3: int, c4: int, num_blocks: int, trailing_conv: bool, act: str = "silu"
    ) -> None:
        super().__init__()
        self.cv1 = FusableConvNormLayer(c1, c3, 1, act=act)
        self.cv2 = nn.Sequential(CSPLayer2(c3 // 2, c4, num_blocks, act))
        self.cv3 = nn.Sequential(CSPLayer2(c4, c4, num_blocks, act))
        if trailing_conv:
            self.cv2.append(FusableConvNormLayer(c4, c4, 3, act=act))
            self.cv3.append(FusableConvNormLayer(c4, c4, 3, act=act))
        self.cv4 = FusableConvNormLayer(c3 + 2 * c4, c2, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        y0, y1 = self.cv1(x).chunk(2, dim=1)
        y2 = self.cv2(y1)
        y3 = self.cv3(y2)
        return self.cv4(torch.cat([y0, y1, y2, y3], dim=1))


class SCDown(nn.Module):
    """Spatial-channel downsample without activation: 1×1 conv, then depthwise k×k conv with ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.cv1 = FusableConvNormLayer(in_channels, out_channels, 1)
        self.cv2 = FusableConvNormLayer(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer on B×N×D tokens; the positional embedding is added to queries and keys only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, activation: str = "gelu") -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = get_activation(activation)

    def forward(self, src: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        q = k = src if pos_embed is None else src + pos_embed
        attn, _ = self.self_attn(q, k, value=src, need_weights=False)
        src = self.norm1(src + attn)
        return self.norm2(src + self.linear2(self.activation(self.linear1(src))))


class TransformerEncoder(nn.Module):
    """``num_layers`` deep copies of one TransformerEncoderLayer applied in sequence (keys ``layers.{l}.*``)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, src: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed=pos_embed)
        return src


def convert_blocks_to_deploy(module: nn.Module) -> None:
    """Fold every FusableConvNormLayer and VGGBlock below ``module`` for inference (call in eval mode)."""
    for block in list(module.modules()):
        if isinstance(block, FusableConvNormLayer | VGGBlock):
            block.convert_to_deploy()
