"""Reading official DEIMv2 checkpoints and loading them into our detector, with one-line errors for bad files.

An official training checkpoint is a dict with ``model`` and, when EMA was on, ``ema = {"module": state_dict,
"updates": n}``; the EMA weights are the ones every official tool evaluates, so they are the default here too.
"""

from pathlib import Path

import torch
from torch import Tensor

from deim_lib.errors import CheckpointError
from deim_lib.model import DEIM, build_detector
from deim_lib.variants import VARIANTS

# Tensors whose first dimension is the class count (the denoising embedding has one extra padding row).
CLASS_HEAD_PREFIXES = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` (weights only) with clear errors for missing, truncated and foreign files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; pass the path of a .pth file in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; pass the path of a DEIMv2 .pth file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated zips, pickles and foreign formats
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({reason[:160]}); re-download or re-save it"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    return checkpoint


def detector_state_dict(checkpoint: dict, path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The detector weights of a checkpoint and where they were found, for messages.

    Official training checkpoints hold them under ``ema.module`` (preferred) or ``model``; a bare
    ``torch.save(model.state_dict())`` is the dict itself. A ``module.`` prefix (saved from inside DDP or
    DataParallel) and an ``_orig_mod.`` prefix (saved from a ``torch.compile`` wrapper) are removed.
    """
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        state_dict, where = ema["module"], "'ema.module'"
    elif isinstance(checkpoint.get("model"), dict):
        state_dict, where = checkpoint["model"], "'model'"
    elif checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        state_dict, where = checkpoint, "a bare state dict"
    else:
        raise CheckpointError(
            f"{path}: no 'ema.module' or 'model' state dict inside and not a state dict itself (top-level keys: "
            f"{sorted(checkpoint)[:8]}); this is not a DEIMv2 checkpoint"
        )
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
            where += f", {prefix!r} prefix removed"
    if not any(key.startswith("decoder.") for key in state_dict):
        raise CheckpointError(
            f"{path}: the state dict in {where} has no 'decoder.*' keys (first keys: {list(state_dict)[:3]}); "
            "this is not a DEIMv2 detector"
        )
    return state_dict, where


def load_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict to load from an official DEIMv2 checkpoint file (EMA weights when present)."""
    return detector_state_dict(read_checkpoint(path), path)[0]


def checkpoint_num_classes(state_dict: dict[str, Tensor]) -> int:
    return state_dict["decoder.enc_score_head.weight"].shape[0]


def _is_class_head(key: str) -> bool:
    return key.startswith(CLASS_HEAD_PREFIXES)


# The anchor grid depends on the input size, the class heads on the class count: neither identifies a variant.
_SIZE_DEPENDENT = ("decoder.anchors", "decoder.valid_mask")


def _shape_signature(state_dict: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not _is_class_head(key) and key not in _SIZE_DEPENDENT
    }


def guess_variant(state_dict: dict[str, Tensor]) -> str | None:
    """The variant whose keys and class-independent shapes equal ``state_dict``'s, if any (models built on 'meta')."""
    signature = _shape_signature(state_dict)
    for name in VARIANTS:
        with torch.device("meta"):
            candidate = build_detector(name, checkpoint_num_classes(state_dict))
        if _shape_signature(candidate.state_dict()) == signature:
            return name
    return None


def checkpoint_image_size(state_dict: dict[str, Tensor], variant: str) -> int:
    """The square input size the checkpoint's anchor grid was made for (A = Σ (S / stride)² positions)."""
    positions = state_dict["decoder.anchors"].shape[1]
    strides = VARIANTS[variant].decoder.feat_strides
    size = round((positions / sum(1 / stride**2 for stride in strides)) ** 0.5)
    if sum((size // stride) ** 2 for stride in strides) != positions:
        raise CheckpointError(f"the anchors ({positions} positions) fit no square input size of variant {variant!r}")
    return size


def load_detector_state(
    model: DEIM, state_dict: dict[str, Tensor], source: str | Path, reinit_class_heads: bool = False
) -> list[str]:
    """Load ``state_dict`` into ``model`` strictly; returns the keys left at their fresh initialisation.

    A checkpoint of another variant is an error naming the variant its keys look like. A different class count is an
    error unless ``reinit_class_heads``: then the class-dependent tensors (encoder/decoder score heads, denoising
    embedding) keep the model's fresh initialisation and their names are returned.
    """
    expected = model.state_dict()
    if _shape_signature(expected) != _shape_signature(state_dict):
        looks_like = guess_variant(state_dict)
        hint = f"its keys look like variant {looks_like!r}" if looks_like else "its keys match no DEIMv2 variant"
        raise CheckpointError(f"{source}: checkpoint does not fit variant {model.variant!r}; {hint}")
    anchors = "decoder.anchors"
    if state_dict[anchors].shape != expected[anchors].shape:
        raise CheckpointError(
            f"{source}: checkpoint was made for another input size ({state_dict[anchors].shape[1]} anchor positions, "
            f"the model has {expected[anchors].shape[1]}); set model.image_size to the size it was trained at"
        )

    found_classes = checkpoint_num_classes(state_dict)
    if found_classes != model.num_classes and not reinit_class_heads:
        raise CheckpointError(
            f"{source}: checkpoint has {found_classes} classes, the model {model.num_classes}; "
            "set model.reinit_class_heads: true to re-initialise the class heads for the new classes"
        )
    reinitialised = []
    if found_classes != model.num_classes:
        reinitialised = sorted(key for key in expected if _is_class_head(key))
        state_dict = {key: value for key, value in state_dict.items() if not _is_class_head(key)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if sorted(missing) != reinitialised or unexpected:
        raise CheckpointError(f"{source}: unexpected key mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return reinitialised
