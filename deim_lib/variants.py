"""The DEIMv2 variants as a literal table: architecture, input, loss and optimiser facts of each released config.

Eight variants are released with checkpoints (atto, femto, pico, n with HGNetv2 backbones; s, m, l, x with DINOv3-family
ViTs and the spatial-tuning adapter). The four HGNetv2 S/M/L/X configurations have no released weights but build the
same way. Values are those the official YAML configs resolve to.
"""

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HGNetv2Config:
    name: str
    return_idx: tuple[int, ...]
    use_lab: bool
    freeze_at: int = -1
    freeze_stem_only: bool = True
    freeze_norm: bool = False


@dataclass(frozen=True)
class ViTAdapterConfig:
    name: str
    interaction_indexes: tuple[int, ...]
    conv_inplane: int
    hidden_dim: int
    embed_dim: int | None = None  # only the ViT-Tiny family takes its width from here
    num_heads: int | None = None


@dataclass(frozen=True)
class HybridEncoderConfig:
    in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    hidden_dim: int
    dim_feedforward: int
    expansion: float
    depth_mult: float
    version: str  # "deim" → RepNCSPELAN5 fuse blocks, "dfine" → RepNCSPELAN4


@dataclass(frozen=True)
class LiteEncoderConfig:
    in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    hidden_dim: int
    expansion: float
    depth_mult: float


@dataclass(frozen=True)
class DecoderConfig:
    hidden_dim: int
    num_queries: int
    feat_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    num_points: tuple[int, ...]
    num_layers: int
    dim_feedforward: int
    use_gateway: bool
    share_bbox_head: bool
    reg_scale: int = 4


@dataclass(frozen=True)
class Variant:
    name: str
    backbone: HGNetv2Config | ViTAdapterConfig
    encoder: HybridEncoderConfig | LiteEncoderConfig
    decoder: DecoderConfig
    eval_size: tuple[int, int]  # (H, W); the decoder anchors and encoder positional embedding are built for it
    imagenet_normalize: bool  # DINOv3-family inputs are ImageNet-normalised, HGNetv2 inputs stay in [0, 1]
    use_local_losses: bool  # FGL/DDF terms and the union ("go") matching; off for atto/femto/pico
    matcher_change_epoch: int
    base_lr: float
    backbone_lr: float
    weight_decay: float

    @property
    def released(self) -> bool:
        return not self.name.startswith("hgnetv2_")


def _hgnetv2_variant(name, backbone, encoder, decoder, eval_size, matcher_change_epoch, lrs, wd=1e-4, local=True):
    return Variant(name, backbone, encoder, decoder, eval_size, False, local, matcher_change_epoch, *lrs, wd)


def _vit_variant(name, backbone, encoder, decoder, matcher_change_epoch, backbone_lr, wd):
    return Variant(
        name, backbone, encoder, decoder, (640, 640), True, True, matcher_change_epoch, 5e-4, backbone_lr, wd
    )


_S8_16_32 = (8, 16, 32)
_S16_32 = (16, 32)

VARIANTS: dict[str, Variant] = {
    "atto": _hgnetv2_variant(
        "atto",
        HGNetv2Config("Atto", (2,), use_lab=True),
        LiteEncoderConfig((256,), (16,), 64, 0.34, 0.5),
        DecoderConfig(64, 100, (64, 64), _S16_32, (4, 2), 3, 160, use_gateway=False, share_bbox_head=True),
        (320, 320),
        450,
        (2e-3, 1e-3),
        local=False,
    ),
    "femto": _hgnetv2_variant(
        "femto",
        HGNetv2Config("Femto", (2,), use_lab=True),
        LiteEncoderConfig((512,), (16,), 96, 0.34, 0.5),
        DecoderConfig(96, 150, (96, 96), _S16_32, (4, 2), 3, 256, use_gateway=False, share_bbox_head=True),
        (416, 416),
        450,
        (1.6e-3, 8e-4),
        local=False,
    ),
    "pico": _hgnetv2_variant(
        "pico",
        HGNetv2Config("Pico", (2,), use_lab=True),
        LiteEncoderConfig((512,), (16,), 112, 0.34, 0.5),
        DecoderConfig(112, 200, (112, 112), _S16_32, (4, 2), 3, 320, use_gateway=False, share_bbox_head=True),
        (640, 640),
        450,
        (1.6e-3, 8e-4),
        local=False,
    ),
    "n": _hgnetv2_variant(
        "n",
        HGNetv2Config("B0", (2, 3), use_lab=True),
        HybridEncoderConfig((512, 1024), _S16_32, 128, 512, 0.34, 0.5, "dfine"),
        DecoderConfig(128, 300, (128, 128), _S16_32, (6, 6), 3, 512, use_gateway=True, share_bbox_head=False),
        (640, 640),
        136,
        (8e-4, 4e-4),
    ),
    "s": _vit_variant(
        "s",
        ViTAdapterConfig("vit_tiny", (3, 7, 11), 16, 192, embed_dim=192, num_heads=3),
        HybridEncoderConfig((192,) * 3, _S8_16_32, 192, 512, 0.34, 0.67, "deim"),
        DecoderConfig(192, 300, (192,) * 3, _S8_16_32, (3, 6, 3), 4, 512, use_gateway=True, share_bbox_head=False),
        100,
        2.5e-5,
        1e-4,
    ),
    "m": _vit_variant(
        "m",
        ViTAdapterConfig("vit_tinyplus", (3, 7, 11), 16, 256, embed_dim=256, num_heads=4),
        HybridEncoderConfig((256,) * 3, _S8_16_32, 256, 512, 0.67, 1.0, "deim"),
        DecoderConfig(256, 300, (256,) * 3, _S8_16_32, (3, 6, 3), 4, 512, use_gateway=True, share_bbox_head=False),
        80,
        2.5e-5,
        1e-4,
    ),
    "l": _vit_variant(
        "l",
        ViTAdapterConfig("dinov3_vits16", (5, 8, 11), 32, 224),
        HybridEncoderConfig((224,) * 3, _S8_16_32, 224, 896, 1.0, 1.0, "deim"),
        DecoderConfig(224, 300, (224,) * 3, _S8_16_32, (3, 6, 3), 4, 1792, use_gateway=True, share_bbox_head=False),
        50,
        1.25e-5,
        1.25e-4,
    ),
    "x": _vit_variant(
        "x",
        ViTAdapterConfig("dinov3_vits16plus", (5, 8, 11), 64, 256),
        HybridEncoderConfig((256,) * 3, _S8_16_32, 256, 1024, 1.25, 1.37, "deim"),
        DecoderConfig(256, 300, (256,) * 3, _S8_16_32, (3, 6, 3), 6, 2048, use_gateway=True, share_bbox_head=False),
        45,
        1e-5,
        1.25e-4,
    ),
    "hgnetv2_s": _hgnetv2_variant(
        "hgnetv2_s",
        HGNetv2Config("B0", (1, 2, 3), use_lab=True),
        HybridEncoderConfig((256, 512, 1024), _S8_16_32, 256, 1024, 0.5, 0.34, "dfine"),
        DecoderConfig(256, 300, (256,) * 3, _S8_16_32, (3, 6, 3), 3, 2048, use_gateway=True, share_bbox_head=False),
        (640, 640),
        100,
        (4e-4, 2e-4),
    ),
    "hgnetv2_m": _hgnetv2_variant(
        "hgnetv2_m",
        HGNetv2Config("B2", (1, 2, 3), use_lab=True),
        HybridEncoderConfig((384, 768, 1536), _S8_16_32, 256, 1024, 1.0, 0.67, "deim"),
        DecoderConfig(256, 300, (256,) * 3, _S8_16_32, (3, 6, 3), 4, 2048, use_gateway=True, share_bbox_head=False),
        (640, 640),
        80,
        (4e-4, 4e-5),
    ),
    "hgnetv2_l": _hgnetv2_variant(
        "hgnetv2_l",
        HGNetv2Config("B4", (1, 2, 3), use_lab=False),
        HybridEncoderConfig((512, 1024, 2048), _S8_16_32, 256, 1024, 1.0, 1.0, "deim"),
        DecoderConfig(256, 300, (256,) * 3, _S8_16_32, (3, 6, 3), 6, 2048, use_gateway=True, share_bbox_head=False),
        (640, 640),
        45,
        (5e-4, 2.5e-5),
        wd=1.25e-4,
    ),
    "hgnetv2_x": _hgnetv2_variant(
        "hgnetv2_x",
        HGNetv2Config("B5", (1, 2, 3), use_lab=False, freeze_at=0, freeze_stem_only=True, freeze_norm=True),
        HybridEncoderConfig((512, 1024, 2048), _S8_16_32, 384, 2048, 1.0, 1.0, "deim"),
        # The only variant whose decoder is narrower than its encoder (384 → 256 input projections) and reg_scale 8.
        DecoderConfig(
            256, 300, (384,) * 3, _S8_16_32, (3, 6, 3), 6, 2048, use_gateway=True, share_bbox_head=False, reg_scale=8
        ),
        (640, 640),
        45,
        (5e-4, 5e-6),
        wd=1.25e-4,
    ),
}

RELEASED_VARIANTS = tuple(name for name, variant in VARIANTS.items() if variant.released)


def get_variant(name: str) -> Variant:
    """The variant called ``name``; an unknown name is an error listing the valid ones."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DEIMv2 variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
