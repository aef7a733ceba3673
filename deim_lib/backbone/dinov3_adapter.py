"""DINOv3STAs: DEIMv2's ViT backbone adapter (variants S, M, L, X).

A ViT gives semantic features at stride 16 from three blocks; they are resized to strides 8 / 16 / 32 (shallowest block
→ finest level), concatenated with the detail features of a small CNN (the spatial prior module, "STA") and projected
by a 1×1 conv + BatchNorm per level.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deim_lib.backbone.dinov3_vit import DINOV3_PRESETS, DINOv3ViT
from deim_lib.backbone.vit_tiny import ViTTiny

# Default (embed_dim, num_heads) of the distilled ViT-Tiny backbones; explicit constructor values win.
VIT_TINY_SIZES = {"vit_tiny": (192, 3), "vit_tinyplus": (256, 4)}
# The token grid is read at stride 16 whatever the ViT, as official DEIMv2 does.
TOKEN_STRIDE = 16


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels)]


class SpatialPriorModulev2(nn.Module):
    """Detail CNN: (B, 3, H, W) → c2 (B, 2p, H/8, W/8), c3 (B, 4p, H/16, W/16), c4 (B, 4p, H/32, W/32).

    All convs are 3×3 stride 2 without bias, each followed by BatchNorm; GELU between stages, none on the outputs.
    """

    def __init__(self, inplanes: int) -> None:
        super().__init__()
        p = inplanes
        self.stem = nn.Sequential(*_conv_bn(3, p), nn.GELU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn(p, 2 * p))
        self.conv3 = nn.Sequential(nn.GELU(), *_conv_bn(2 * p, 4 * p))
        self.conv4 = nn.Sequential(nn.GELU(), *_conv_bn(4 * p, 4 * p))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c2 = self.conv2(self.stem(x))
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return c2, c3, c4


class DINOv3STAs(nn.Module):
    """ViT + spatial-prior adapter returning three feature maps, fine → coarse.

    Args:
        name: "vit_tiny" (S) or "vit_tinyplus" (M): the distilled ViT-Tiny with ``embed_dim``/``num_heads`` (defaults
            192/3 and 256/4); "dinov3_vits16" (L) or "dinov3_vits16plus" (X): DINOv3 ViT-S/16(+) from its preset.
        interaction_indexes: 0-based ViT blocks feeding strides 8, 16, 32 (one index is used for all three levels).
        conv_inplane: STA base width p.
        hidden_dim: output channels of every level; defaults to the ViT width.
        embed_dim, num_heads: ViT-Tiny size; must be None or equal to the preset for the DINOv3 names.
    """

    def __init__(
        self,
        name: str,
        interaction_indexes: Sequence[int],
        conv_inplane: int,
        hidden_dim: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        if len(interaction_indexes) not in (1, 3):
            raise ValueError(f"interaction_indexes needs 1 or 3 block indices, got {list(interaction_indexes)}")
        self.interaction_indexes = tuple(interaction_indexes)
        self.dinov3 = _build_vit(name, embed_dim, num_heads)
        embed = self.dinov3.embed_dim
        hidden = embed if hidden_dim is None else hidden_dim
        self.sta = SpatialPriorModulev2(conv_inplane)
        detail_channels = (2 * conv_inplane, 4 * conv_inplane, 4 * conv_inplane)
        self.convs = nn.ModuleList(nn.Conv2d(embed + c, hidden, kernel_size=1, bias=False) for c in detail_channels)
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden) for _ in detail_channels)
        self.out_channels = [hidden] * 3

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) ImageNet-normalised float, H and W multiples of 32.

        Returns [(B, hidden, H/8, W/8), (B, hidden, H/16, W/16), (B, hidden, H/32, W/32)].
        """
        B = x.shape[0]
        h, w = x.shape[-2] // TOKEN_STRIDE, x.shape[-1] // TOKEN_STRIDE
        semantic = self.dinov3.get_intermediate_layers(x, self.interaction_indexes)
        if len(semantic) == 1:
            semantic = semantic * 3
        outputs = []
        for level, (tokens, detail) in enumerate(zip(semantic, self.sta(x), strict=True)):
            feature = tokens.transpose(1, 2).reshape(B, -1, h, w)
            if level != 1:  # ×2 for stride 8, ×0.5 (= 2×2 mean) for stride 32; stride 16 is the token grid itself
                scale = 2.0 ** (1 - level)
                size = (int(h * scale), int(w * scale))
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            outputs.append(self.norms[level](self.convs[level](torch.cat([feature, detail], dim=1))))
        return outputs

    def load_pretrained(self, path: str | Path) -> None:
        """Load ViT weights strictly: ViT-Tiny files into ``dinov3._model``, DINOv3 files into ``dinov3``.

        Accepts a plain state dict or one nested under "model", "state_dict" or "teacher". Raises a one-line
        ValueError naming the file and the first offending keys on any missing, unexpected or mis-shaped entry.
        """
        path = Path(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict", "teacher"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        target = self.dinov3._model if isinstance(self.dinov3, ViTTiny) else self.dinov3
        _check_state_dict(target, state, path)
        target.load_state_dict(state, strict=True)


def _build_vit(name: str, embed_dim: int | None, num_heads: int | None) -> ViTTiny | DINOv3ViT:
    if name in VIT_TINY_SIZES:
        default_embed, default_heads = VIT_TINY_SIZES[name]
        return ViTTiny(embed_dim or default_embed, num_heads or default_heads)
    if name in DINOV3_PRESETS:
        preset = DINOV3_PRESETS[name]
        if embed_dim not in (None, preset["embed_dim"]) or num_heads not in (None, preset["num_heads"]):
            raise ValueError(
                f"{name} has embed_dim {preset['embed_dim']}, num_heads {preset['num_heads']}; "
                f"got {embed_dim}, {num_heads}"
            )
        return DINOv3ViT(**preset)
    raise ValueError(f"unknown backbone name {name!r}; valid: {sorted([*VIT_TINY_SIZES, *DINOV3_PRESETS])}")


def _check_state_dict(module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mis_shaped:
        problems = {"missing": missing, "unexpected": unexpected, "shape mismatch": mis_shaped}
        summary = "; ".join(f"{kind} {keys[:5]}" for kind, keys in problems.items() if keys)
        raise ValueError(f"{path}: does not match {type(module).__name__} — {summary}")
