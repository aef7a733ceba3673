"""The DEIMv2 data recipe of every variant (policy windows, Mosaic, MixUp, CopyBlend, multi-scale), as a table."""

from deim_lib.data.transforms import AugmentationRecipe

_NEVER = (40000, 15000)  # atto/femto/pico: MixUp and CopyBlend windows that never open


def _vit_like(e1: int, e2: int, multiscale_repeat: int) -> AugmentationRecipe:
    """S/M/L/X and HGNetv2 S–X: Mosaic and MixUp in [4, e1), CopyBlend and the policy until e2."""
    return AugmentationRecipe(
        policy_epochs=(4, e1, e2),
        mixup_epochs=(4, e1),
        copyblend_epochs=(4, e2),
        multiscale_base=640,
        multiscale_repeat=multiscale_repeat,
        stop_epoch=e2,
    )


def _lite(mosaic_output_size: int, mosaic_prob: float, sanitize_min_size: float) -> AugmentationRecipe:
    return AugmentationRecipe(
        mosaic_output_size=mosaic_output_size,
        mosaic_prob=mosaic_prob,
        policy_epochs=(4, 250, 400),
        sanitize_min_size=sanitize_min_size,
        mixup_prob=0.0,
        mixup_epochs=_NEVER,
        copyblend_prob=0.0,
        copyblend_epochs=_NEVER,
        multiscale_base=None,
        stop_epoch=468,
    )


RECIPES: dict[str, AugmentationRecipe] = {
    "atto": _lite(160, 0.3, 12),
    "femto": _lite(208, 0.5, 10),
    "pico": _lite(320, 0.5, 8),
    "n": AugmentationRecipe(
        policy_epochs=(4, 78, 148),
        mixup_epochs=(4, 78),
        copyblend_prob=0.4,
        copyblend_epochs=(4, 78),
        multiscale_base=None,
        stop_epoch=148,
    ),
    "s": _vit_like(64, 120, 20),
    "m": _vit_like(49, 90, 6),
    "l": _vit_like(34, 60, 3),
    "x": _vit_like(29, 50, 3),
    "hgnetv2_s": _vit_like(64, 120, 20),
    "hgnetv2_m": _vit_like(49, 90, 6),
    "hgnetv2_l": _vit_like(29, 50, 4),
    "hgnetv2_x": _vit_like(29, 50, 3),
}


def augmentation_recipe(variant: str) -> AugmentationRecipe:
    if variant not in RECIPES:
        raise ValueError(f"no data recipe for variant {variant!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[variant]
