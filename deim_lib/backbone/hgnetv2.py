"""HGNetv2 backbone (PP-HGNetV2), module tree and state_dict keys as in official DEIMv2.

Input: float32 images B×3×H×W with raw [0, 1] pixels (no ImageNet normalisation for HGNetv2 variants). Output: the
feature maps of the stages named by ``return_idx``, fine → coarse; stage i has stride 4·2^i (4, 8, 16, 32).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.errors import CheckpointError

__all__ = ["FrozenBatchNorm2d", "HGNetv2"]


class _StageSpec(NamedTuple):
    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    num_layers: int


def _stages(*rows: tuple) -> tuple[_StageSpec, ...]:
    return tuple(_StageSpec(*row) for row in rows)


_T, _F = True, False
_TINY_STAGES = ((16, 16, 64, 1, _F, _F, 3, 3), (64, 32, 256, 1, _T, _F, 3, 3))
# name → (stem (in, mid, out), stages (in, mid, out, blocks, downsample, light, kernel, layers)).
_ARCHS: dict[str, tuple[tuple[int, int, int], tuple[_StageSpec, ...]]] = {
    "Atto": ((3, 16, 16), _stages(*_TINY_STAGES, (256, 64, 256, 1, _T, _T, 3, 3))),
    "Femto": ((3, 16, 16), _stages(*_TINY_STAGES, (256, 64, 512, 1, _T, _T, 5, 3))),
    "Pico": ((3, 16, 16), _stages(*_TINY_STAGES, (256, 64, 512, 2, _T, _T, 5, 3))),
    "B0": ((3, 16, 16), _stages(*_TINY_STAGES, (256, 64, 512, 2, _T, _T, 5, 3), (512, 128, 1024, 1, _T, _T, 5, 3))),
    "B1": (
        (3, 24, 32),
        _stages(
            (32, 32, 64, 1, _F, _F, 3, 3),
            (64, 48, 256, 1, _T, _F, 3, 3),
            (256, 96, 512, 2, _T, _T, 5, 3),
            (512, 192, 1024, 1, _T, _T, 5, 3),
        ),
    ),
    "B2": (
        (3, 24, 32),
        _stages(
            (32, 32, 96, 1, _F, _F, 3, 4),
            (96, 64, 384, 1, _T, _F, 3, 4),
            (384, 128, 768, 3, _T, _T, 5, 4),
            (768, 256, 1536, 1, _T, _T, 5, 4),
        ),
    ),
    "B3": (
        (3, 24, 32),
        _stages(
            (32, 32, 128, 1, _F, _F, 3, 5),
            (128, 64, 512, 1, _T, _F, 3, 5),
            (512, 128, 1024, 3, _T, _T, 5, 5),
            (1024, 256, 2048, 1, _T, _T, 5, 5),
        ),
    ),
    "B4": (
        (3, 32, 48),
        _stages(
            (48, 48, 128, 1, _F, _F, 3, 6),
            (128, 96, 512, 1, _T, _F, 3, 6),
            (512, 192, 1024, 3, _T, _T, 5, 6),
            (1024, 384, 2048, 1, _T, _T, 5, 6),
        ),
    ),
    "B5": (
        (3, 32, 64),
        _stages(
            (64, 64, 128, 1, _F, _F, 3, 6),
            (128, 128, 512, 2, _T, _F, 3, 6),
            (512, 256, 1024, 5, _T, _T, 5, 6),
            (1024, 512, 2048, 2, _T, _T, 5, 6),
        ),
    ),
    "B6": (
        (3, 48, 96),
        _stages(
            (96, 96, 192, 2, _F, _F, 3, 6),
            (192, 192, 512, 3, _T, _F, 3, 6),
            (512, 384, 1024, 6, _T, _T, 5, 6),
            (1024, 768, 2048, 3, _T, _T, 5, 6),
        ),
    ),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all stored as buffers (nothing to train).

    Keys: ``weight``, ``bias``, ``running_mean``, ``running_var`` (float32 [C]); no ``num_batches_tracked``, and such a
    key in a loaded state dict is dropped. y = x·w/√(rv+eps) + (b − rm·w/√(rv+eps)) on B×C×H×W.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # Checkpoints written from a plain BatchNorm2d carry this counter; it means nothing for frozen statistics.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LearnableAffineBlock(nn.Module):
    """y = scale·x + bias with two scalar parameters (``scale``, ``bias``, each shape [1])."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Bias-free conv (padding (k−1)//2) → BatchNorm2d → in-place ReLU and, with ``use_lab``, a learnable affine."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True) if use_act else nn.Identity()
        self.lab = LearnableAffineBlock() if use_act and use_lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """1×1 conv without activation, then a depthwise k×k ConvBNAct with activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: 3×3/2 conv, then a 2×2-conv branch beside a 2×2 max-pool, concatenated, 3×3/2 and 1×1 convs."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid_channels, mid_channels // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid_channels // 2, mid_channels, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid_channels * 2, mid_channels, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        # The 2×2 kernels have no implicit padding; padding right/bottom by one keeps the spatial size.
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        x = torch.cat([self.pool(x), branch], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    """A chain of ``num_layers`` convs whose outputs (and the input) are concatenated and squeezed by two 1×1 convs."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_layers: int,
        kernel_size: int,
        residual: bool,
        light_block: bool,
        use_lab: bool,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer_in = in_channels if i == 0 else mid_channels
            if light_block:
                self.layers.append(LightConvBNAct(layer_in, mid_channels, kernel_size, use_lab))
            else:
                self.layers.append(ConvBNAct(layer_in, mid_channels, kernel_size, use_lab=use_lab))
        total_channels = in_channels + num_layers * mid_channels
        self.aggregation = nn.Sequential(
            ConvBNAct(total_channels, out_channels // 2, 1, use_lab=use_lab),
            ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab),
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.aggregation(torch.cat(outputs, dim=1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    """Optional depthwise 3×3 stride-2 downsample (no activation), then HG blocks (all but the first residual)."""

    def __init__(self, spec: _StageSpec, use_lab: bool) -> None:
        super().__init__()
        c_in = spec.in_channels
        if spec.downsample:
            self.downsample = ConvBNAct(c_in, c_in, 3, stride=2, groups=c_in, use_act=False, use_lab=use_lab)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                HGBlock(
                    c_in if i == 0 else spec.out_channels,
                    spec.mid_channels,
                    spec.out_channels,
                    spec.num_layers,
                    spec.kernel_size,
                    residual=i > 0,
                    light_block=spec.light_block,
                    use_lab=use_lab,
                )
                for i in range(spec.num_blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


def _replace_batchnorm(module: nn.Module) -> None:
    """Swap every BatchNorm2d below ``module`` for a fresh FrozenBatchNorm2d of the same width."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _replace_batchnorm(child)


class HGNetv2(nn.Module):
    """PP-HGNetV2 backbone.

    Args:
        name: architecture, one of Atto, Femto, Pico, B0…B6.
        return_idx: 0-based stage indices whose outputs are returned (stage i has stride 4·2^i).
        use_lab: add a learnable scalar affine after every activation.
        freeze_at: ≥ 0 freezes the stem (requires_grad False), and stages 0..freeze_at unless ``freeze_stem_only``.
        freeze_norm: replace every BatchNorm2d by FrozenBatchNorm2d.

    forward: float32 B×3×H×W in [0, 1] → list of B×out_channels[i]×H/s×W/s maps, fine → coarse.
    """

    def __init__(
        self,
        name: str,
        return_idx: Sequence[int],
        use_lab: bool,
        freeze_at: int = -1,
        freeze_stem_only: bool = True,
        freeze_norm: bool = False,
    ) -> None:
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown HGNetv2 name {name!r}; expected one of {sorted(_ARCHS)}")
        stem, stages = _ARCHS[name]
        if not return_idx or any(not 0 <= i < len(stages) for i in return_idx):
            raise ValueError(f"HGNetv2 {name} return_idx {list(return_idx)} must name stages in 0..{len(stages) - 1}")
        self.return_idx = list(return_idx)
        self.out_channels = [stages[i].out_channels for i in self.return_idx]
        self.out_strides = [4 * 2**i for i in self.return_idx]
        self.stem = StemBlock(*stem, use_lab=use_lab)
        self.stages = nn.ModuleList([HGStage(spec, use_lab) for spec in stages])
        if freeze_at >= 0:
            self.stem.requires_grad_(False)
            if not freeze_stem_only:
                for stage in self.stages[: freeze_at + 1]:
                    stage.requires_grad_(False)
        if freeze_norm:
            _replace_batchnorm(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for idx, stage in enumerate(self.stages):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Load an official PPHGNetV2 weight file, keeping only the entries whose key and shape match this model.

        The file holds a state dict, plain or under ``model``/``state_dict``. Returns the loaded keys. Raises a
        ``CheckpointError`` naming the file when it is not such a state dict or when no entry matches.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a loadable weight file ({type(exc).__name__})") from None
        if isinstance(state, dict):
            state = state.get("model", state.get("state_dict", state))
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors (plain or under 'model'/'state_dict')")
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        if not matched:
            raise CheckpointError(f"{path}: no entry matches an HGNetv2 key and shape; is it an HGNetv2 weight file?")
        self.load_state_dict(matched, strict=False)
        return list(matched)
