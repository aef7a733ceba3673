"""DEIMv2 augmentation pipeline: boxes follow the pixels through every op, epoch policy windows, determinism."""

import random
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from deim_lib.box_ops import box_cxcywh_to_xyxy
from deim_lib.data.dataset import CocoDetection
from deim_lib.data.transforms import (
    AugmentationRecipe,
    BoxesToNormalizedCxcywh,
    ConvertPILImage,
    GatedRandomIoUCrop,
    Mosaic,
    build_train_transforms,
    build_val_transforms,
)

PAINTED_LABEL = 999
PAINTED_BOX = (300.0, 150.0, 390.0, 215.0)  # XYXY pixels, inside the 640-wide COCO image used below
RECIPE = AugmentationRecipe()
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def real_sample(datasets_dir) -> tuple[Image.Image, dict]:
    """A real COCO image with its real boxes plus one extra box (label 999) over the region the tests paint."""
    root = datasets_dir / "coco-tiny"
    dataset = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json")
    image, target = dataset[0]
    boxes = torch.cat([target["boxes"].as_subclass(torch.Tensor), torch.tensor([PAINTED_BOX])])
    target = {
        **target,
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width)),
        "labels": torch.cat([target["labels"], torch.tensor([PAINTED_LABEL])]),
        "area": torch.cat([target["area"], torch.tensor([90.0 * 65.0])]),
        "iscrowd": torch.cat([target["iscrowd"], torch.tensor([0])]),
    }
    return image, target


def _painted(image: Image.Image, fill: int) -> Image.Image:
    painted = image.copy()
    x1, y1, x2, y2 = PAINTED_BOX
    # PIL's rectangle includes its end pixels; painting up to x2 - 1, y2 - 1 covers exactly the box.
    ImageDraw.Draw(painted).rectangle((x1, y1, x2 - 1, y2 - 1), fill=(fill, fill, fill))
    return painted


def _as_array(image) -> np.ndarray:
    """H×W×3 float array in [0, 1] from a PIL image or a [3, H, W] float tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image, dtype=np.float32) / 255.0
    return image.permute(1, 2, 0).numpy()


def _run_white_and_black(make_op: Callable, sample: tuple, seed: int) -> tuple[object, dict, np.ndarray]:
    """Run a fresh op on the sample painted white and painted black under the same seed.

    The random parameters do not depend on pixel values, so the two outputs differ only where the painted rectangle
    went: returns (white output image, its target, H×W mask of the painted pixels).
    """
    outputs = []
    for fill in (255, 0):
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = sample
        outputs.append(make_op()(_painted(image, fill), dict(target)))
    (white, target), (black, _) = outputs
    mask = np.abs(_as_array(white) - _as_array(black)).max(axis=2) > 0.25
    return white, target, mask


def _check_painted_boxes(
    boxes_xyxy: torch.Tensor, labels: torch.Tensor, mask: np.ndarray, tolerance: float = 2.0, tight: bool = True
) -> int:
    """Each painted-label box must enclose (± tolerance px) the painted pixels around it; with ``tight`` it must also
    be their hull. Rotation (Mosaic's affine) only guarantees enclosure: a rotated box clipped by the canvas border
    keeps the clipped hull of its corners, which can be wider than the visible pixels. Returns the boxes checked."""
    height, width = mask.shape
    checked = 0
    for box in boxes_xyxy[labels == PAINTED_LABEL].tolist():
        x1, y1 = max(int(box[0]) - 4, 0), max(int(box[1]) - 4, 0)
        x2, y2 = min(int(box[2]) + 5, width), min(int(box[3]) + 5, height)
        ys, xs = np.nonzero(mask[y1:y2, x1:x2])
        assert len(xs) > 0, f"box {box} holds no painted pixels"
        hull = [x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1]
        encloses = hull[0] >= box[0] - tolerance and hull[1] >= box[1] - tolerance
        encloses = encloses and hull[2] <= box[2] + tolerance and hull[3] <= box[3] + tolerance
        assert encloses, f"painted pixels span {hull}, outside box {box}"
        assert not tight or np.allclose(hull, box, atol=tolerance), f"painted pixels span {hull}, box says {box}"
        checked += 1
    return checked


def _assert_valid_pixel_boxes(boxes: tv_tensors.BoundingBoxes) -> None:
    height, width = boxes.canvas_size
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


SINGLE_OPS = {
    "mosaic": lambda: v2.Compose([Mosaic(320), v2.SanitizeBoundingBoxes()]),
    "photometric": lambda: v2.RandomPhotometricDistort(p=1.0),
    "zoom_out": lambda: v2.RandomZoomOut(fill=0, p=1.0),
    "iou_crop": lambda: v2.Compose([GatedRandomIoUCrop(p=1.0), v2.SanitizeBoundingBoxes()]),
    "flip": lambda: v2.RandomHorizontalFlip(p=1.0),
    "resize": lambda: v2.Resize([320, 320]),
}


@pytest.mark.parametrize("name", list(SINGLE_OPS))
def test_each_op_keeps_the_box_on_the_painted_pixels(real_sample, name):
    checked = 0
    for seed in range(8):
        image, target, mask = _run_white_and_black(SINGLE_OPS[name], real_sample, seed)
        _assert_valid_pixel_boxes(target["boxes"])
        assert target["boxes"].canvas_size == (image.height, image.width)
        checked += _check_painted_boxes(target["boxes"], target["labels"], mask, tight=name != "mosaic")
    assert checked >= 8  # the box must survive most draws (mosaic yields four copies per draw)


@pytest.mark.parametrize("epoch", [10, 70])
def test_deimv2_pipeline_boxes_follow_painted_pixels_and_stay_valid(real_sample, epoch):
    size = 320

    def make_pipeline() -> Callable:
        return partial(build_train_transforms("deimv2", size, None, RECIPE), epoch=epoch)

    checked = 0
    for seed in range(12):
        image, target, mask = _run_white_and_black(make_pipeline, real_sample, seed)
        boxes = target["boxes"]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32
        assert len(boxes) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
        xyxy = box_cxcywh_to_xyxy(boxes)
        assert (boxes[:, 2:] > 0).all() and (xyxy >= 0).all() and (xyxy <= 1 + 1e-6).all()
        checked += _check_painted_boxes(xyxy * size, target["labels"], mask, tight=epoch >= RECIPE.policy_epochs[1])
    assert checked >= 6


def _op_types(ops) -> list[type]:
    return [type(op) for op in ops]


NON_POLICY = [
    v2.SanitizeBoundingBoxes,
    v2.RandomHorizontalFlip,
    v2.Resize,
    v2.SanitizeBoundingBoxes,
    ConvertPILImage,
    BoxesToNormalizedCxcywh,
]
WITH_MOSAIC = [Mosaic, v2.RandomPhotometricDistort, *NON_POLICY]
WITHOUT_MOSAIC = [v2.RandomPhotometricDistort, v2.RandomZoomOut, GatedRandomIoUCrop, *NON_POLICY]


@pytest.mark.parametrize(
    ("epochs", "allowed"),
    [
        ([-1, 0, 3], [NON_POLICY]),
        ([4, 30, 63], [WITH_MOSAIC, WITHOUT_MOSAIC]),
        ([64, 100, 119], [WITHOUT_MOSAIC]),
        ([120, 131, 500], [NON_POLICY]),
    ],
)
def test_policy_windows_select_exactly_the_expected_ops(epochs, allowed):
    pipeline = build_train_transforms("deimv2", 320, None, RECIPE)
    random.seed(0)
    for epoch in epochs:
        seen = [_op_types(pipeline.select_ops(epoch)) for _ in range(200)]
        assert all(ops in allowed for ops in seen)
        assert all(any(ops == expected for ops in seen) for expected in allowed)
        if len(allowed) == 2:
            mosaic_share = sum(Mosaic in ops for ops in seen) / len(seen)
            assert 0.35 < mosaic_share < 0.65  # mosaic_prob 0.5


def test_policy_draws_python_random_only_inside_the_mosaic_window():
    pipeline = build_train_transforms("deimv2", 320, None, RECIPE)
    for epoch, draws in [(3, False), (10, True), (64, False), (200, False)]:
        random.seed(1)
        pipeline.select_ops(epoch)
        assert (random.random() != random.Random(1).random()) == draws


def test_finetune_preset_runs_its_ops_at_every_epoch_and_normalises():
    pipeline = build_train_transforms("finetune", 320, IMAGENET, RECIPE)
    expected = [
        v2.RandomPhotometricDistort,
        v2.RandomHorizontalFlip,
        v2.Resize,
        v2.SanitizeBoundingBoxes,
        ConvertPILImage,
        v2.Normalize,
        BoxesToNormalizedCxcywh,
    ]
    for epoch in (-1, 10, 70, 500):
        assert _op_types(pipeline.select_ops(epoch)) == expected
    with pytest.raises(ValueError, match="finetune"):
        build_train_transforms("yolo", 320, None, RECIPE)


def test_pipeline_is_deterministic_under_seeds(real_sample):
    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        random.seed(seed)
        torch.manual_seed(seed)
        pipeline = build_train_transforms("deimv2", 320, IMAGENET, RECIPE)
        # Several samples in a row so that the Mosaic cache takes part.
        return [
            (image, target["boxes"])
            for image, target in (pipeline(real_sample[0], dict(real_sample[1]), 10) for _ in range(4))
        ]

    first, second, other = run(3), run(3), run(4)
    for (image_a, boxes_a), (image_b, boxes_b) in zip(first, second, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(boxes_a, boxes_b)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_normalize_applies_mean_and_std_to_the_float_image(real_sample):
    outputs = []
    for normalize in (None, IMAGENET):
        torch.manual_seed(0)
        random.seed(0)
        outputs.append(build_train_transforms("finetune", 320, normalize, RECIPE)(*real_sample, 10)[0])
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in IMAGENET)
    torch.testing.assert_close(outputs[1], (outputs[0] - mean) / std)
    assert outputs[0].min() >= 0.0 and outputs[0].max() <= 1.0


def test_val_transforms_resize_on_pil_and_scale_to_unit_range(real_sample):
    image, target = real_sample
    output, output_target = build_val_transforms(320, None)(image, dict(target))
    expected = TF.pil_to_tensor(image.resize((320, 320), Image.BILINEAR)).float() / 255.0
    assert isinstance(output, tv_tensors.Image) and output.dtype == torch.float32
    torch.testing.assert_close(output.as_subclass(torch.Tensor), expected, atol=1 / 255, rtol=0)
    scale = torch.tensor([320 / image.width, 320 / image.height] * 2)
    torch.testing.assert_close(output_target["boxes"].as_subclass(torch.Tensor), target["boxes"] * scale)


def test_sanitize_drops_area_and_iscrowd_with_their_boxes(real_sample):
    image, target = real_sample
    sliver = tv_tensors.BoundingBoxes(
        torch.cat([target["boxes"], torch.tensor([[10.0, 10.0, 10.4, 80.0]])]),
        format="XYXY",
        canvas_size=target["boxes"].canvas_size,
    )
    target = {
        **target,
        "boxes": sliver,
        "labels": torch.cat([target["labels"], torch.tensor([7])]),
        "area": torch.cat([target["area"], torch.tensor([-5.0])]),
        "iscrowd": torch.cat([target["iscrowd"], torch.tensor([1])]),
    }
    _, output = build_train_transforms("finetune", 320, None, RECIPE)(image, target, 0)
    assert len(output["boxes"]) == len(target["boxes"]) - 1
    assert len(output["labels"]) == len(output["area"]) == len(output["iscrowd"]) == len(output["boxes"])
    assert -5.0 not in output["area"].tolist() and output["iscrowd"].sum() == 0


def test_mosaic_concatenates_targets_and_bounds_its_cache(real_sample):
    random.seed(0)
    torch.manual_seed(0)
    mosaic = Mosaic(320, max_cached_images=5)
    image, target = real_sample
    _, output = mosaic(image, dict(target))
    assert len(output["orig_size"]) == 8 and len(output["image_id"]) == 4
    assert torch.equal(output["labels"], target["labels"].repeat(4))
    for step in range(7):
        mosaic(image, {**target, "idx": torch.tensor([100 + step])})
        assert len(mosaic.cache) == min(step + 2, 5)
        assert mosaic.cache[-1][1]["idx"].item() == 100 + step


def test_gated_iou_crop_skips_with_probability_one_minus_p(real_sample):
    image, target = real_sample
    crop = GatedRandomIoUCrop(p=0.0)
    torch.manual_seed(0)
    output_image, output_target = crop(image, target)
    assert output_image is image and output_target is target
