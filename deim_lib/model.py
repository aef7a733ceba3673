"""The DEIMv2 detector: backbone → encoder → decoder, built from the variant table.

The module tree and parameter names are the official ones (`backbone.*`, `decoder.*`, `encoder.*`), so official
checkpoints load with ``strict=True`` and our weights load back into the official tools.
"""

from dataclasses import replace

from torch import Tensor, nn

from deim_lib.backbone.dinov3_adapter import DINOv3STAs
from deim_lib.backbone.hgnetv2 import HGNetv2
from deim_lib.decoder.deim_transformer import DEIMTransformer
from deim_lib.encoder.hybrid_encoder import HybridEncoder
from deim_lib.encoder.lite_encoder import LiteEncoder
from deim_lib.variants import HGNetv2Config, HybridEncoderConfig, Variant, get_variant


class DEIM(nn.Module):
    """DEIMv2 detector.

    ``forward(images, targets=None)``: ``images`` B×3×H×W float32 at the variant's input size ([0, 1] pixels, ImageNet-
    normalised for the DINOv3 family). Eval mode returns ``{"pred_logits": B×Q×C, "pred_boxes": B×Q×4}`` with boxes as
    normalised cxcywh; training mode returns the full structure the criterion consumes (auxiliary, encoder, pre and
    denoising outputs). ``targets`` (training only, for denoising): list of dicts with ``labels`` int64 [n] and
    ``boxes`` float32 [n, 4] normalised cxcywh.
    """

    def __init__(
        self, backbone: nn.Module, encoder: nn.Module, decoder: DEIMTransformer, variant: str, num_classes: int
    ):
        super().__init__()
        # Registration order backbone, decoder, encoder gives the official state_dict order.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.variant = variant
        self.num_classes = num_classes

    def forward(self, images: Tensor, targets: list[dict] | None = None) -> dict:
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self) -> "DEIM":
        """Fuse conv+BN pairs and drop the heads that inference never uses (the official deploy layout)."""
        self.eval()
        self.encoder.convert_to_deploy()
        self.decoder.convert_to_deploy()
        return self


def build_backbone(variant: Variant) -> nn.Module:
    config = variant.backbone
    if isinstance(config, HGNetv2Config):
        return HGNetv2(
            config.name,
            config.return_idx,
            use_lab=config.use_lab,
            freeze_at=config.freeze_at,
            freeze_stem_only=config.freeze_stem_only,
            freeze_norm=config.freeze_norm,
        )
    return DINOv3STAs(
        config.name,
        config.interaction_indexes,
        config.conv_inplane,
        hidden_dim=config.hidden_dim,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
    )


def build_encoder(variant: Variant) -> nn.Module:
    config = variant.encoder
    if isinstance(config, HybridEncoderConfig):
        return HybridEncoder(
            config.in_channels,
            config.feat_strides,
            hidden_dim=config.hidden_dim,
            dim_feedforward=config.dim_feedforward,
            expansion=config.expansion,
            depth_mult=config.depth_mult,
            version=config.version,
            eval_spatial_size=variant.eval_size,
        )
    return LiteEncoder(
        config.in_channels,
        config.feat_strides,
        hidden_dim=config.hidden_dim,
        expansion=config.expansion,
        depth_mult=config.depth_mult,
        eval_spatial_size=variant.eval_size,
    )


def build_decoder(variant: Variant, num_classes: int) -> DEIMTransformer:
    config = variant.decoder
    return DEIMTransformer(
        num_classes=num_classes,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        feat_channels=config.feat_channels,
        feat_strides=config.feat_strides,
        num_levels=len(config.feat_strides),
        num_points=config.num_points,
        num_layers=config.num_layers,
        dim_feedforward=config.dim_feedforward,
        reg_scale=config.reg_scale,
        use_gateway=config.use_gateway,
        share_bbox_head=config.share_bbox_head,
        eval_spatial_size=variant.eval_size,
    )


def build_detector(variant: str, num_classes: int, eval_size: tuple[int, int] | None = None) -> DEIM:
    """A randomly initialised DEIMv2 detector of ``variant`` (see ``deim_lib.variants.VARIANTS``) for ``num_classes``.

    ``eval_size`` (H, W), multiples of 32, overrides the variant's input size; the anchors stored in the state_dict
    depend on it, so official checkpoints need the default.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    spec = get_variant(variant)
    if eval_size is not None:
        if any(side % 32 for side in eval_size):
            raise ValueError(f"eval_size {tuple(eval_size)} must be multiples of 32")
        spec = replace(spec, eval_size=tuple(eval_size))
    height, width = spec.eval_size
    positions = sum((height // stride) * (width // stride) for stride in spec.decoder.feat_strides)
    if positions < spec.decoder.num_queries:
        raise ValueError(
            f"eval_size {spec.eval_size} gives {positions} feature positions, fewer than the "
            f"{spec.decoder.num_queries} queries of variant {variant!r}; use a larger input size"
        )
    return DEIM(build_backbone(spec), build_encoder(spec), build_decoder(spec, num_classes), variant, num_classes)
