"""BatchImageCollate: stacking, multi-scale sizes, MixUp and CopyBlend on real COCO samples."""

import random
from dataclasses import replace

import pytest
import torch

from deim_lib.box_ops import box_cxcywh_to_xyxy
from deim_lib.data.collate import BatchImageCollate, copy_blend, mixup, multiscale_sizes
from deim_lib.data.dataset import CocoDetection
from deim_lib.data.transforms import AugmentationRecipe, build_train_transforms

SIZE = 320
NO_MIXING = AugmentationRecipe(mixup_prob=0.0, copyblend_prob=0.0, multiscale_base=SIZE, multiscale_repeat=2)


@pytest.fixture(scope="module")
def real_batch(datasets_dir) -> list:
    """Four real COCO samples after the fine-tuning pipeline: ([3, 320, 320] float, target with cxcywh boxes)."""
    root = datasets_dir / "coco-tiny"
    transforms = build_train_transforms("finetune", SIZE, None, AugmentationRecipe())
    dataset = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json", transforms)
    torch.manual_seed(0)
    batch = [dataset[index] for index in range(4)]
    assert all(len(target["boxes"]) > 0 for _, target in batch)
    return batch


def _assert_valid_normalized(boxes: torch.Tensor) -> None:
    xyxy = box_cxcywh_to_xyxy(boxes)
    assert (boxes[:, 2:] > 0).all() and (xyxy >= 0).all() and (xyxy <= 1 + 1e-6).all()


def test_multiscale_sizes_match_deimv2_for_640():
    assert multiscale_sizes(640, 20) == [480, 512, 544, 576, 608] + [640] * 20 + [800, 768, 736, 704, 672]
    assert multiscale_sizes(320, 1) == [224, 256, 288, 320, 384, 352, 320]


def test_validation_collate_only_stacks_and_draws_no_random(real_batch):
    random.seed(5)
    images, targets = BatchImageCollate()(real_batch)
    assert random.random() == random.Random(5).random()
    assert images.shape == (4, 3, SIZE, SIZE) and type(images) is torch.Tensor
    assert torch.equal(images[2], real_batch[2][0]) and targets[2] is real_batch[2][1]


def test_multiscale_draws_sizes_from_the_scale_list_until_stop_epoch(real_batch):
    collate = BatchImageCollate(NO_MIXING)
    assert collate.scales == multiscale_sizes(SIZE, 2)
    assert BatchImageCollate(NO_MIXING, base_size=640).scales == multiscale_sizes(640, 2)
    assert BatchImageCollate(replace(NO_MIXING, multiscale_base=None)).scales is None
    originals = torch.stack([image for image, _ in real_batch])
    random.seed(0)
    collate.set_epoch(NO_MIXING.stop_epoch - 1)
    sizes = set()
    for _ in range(20):
        images, targets = collate(real_batch)
        sizes.add(images.shape[-1])
        # Nearest-neighbour resize of the whole batch; normalised boxes stay as they were.
        assert torch.equal(images, torch.nn.functional.interpolate(originals, size=images.shape[-1], mode="nearest"))
        assert all(
            torch.equal(out["boxes"], sample[1]["boxes"]) for out, sample in zip(targets, real_batch, strict=True)
        )
    assert sizes <= set(collate.scales) and len(sizes) >= 4
    collate.set_epoch(NO_MIXING.stop_epoch)
    assert collate(real_batch)[0].shape[-1] == SIZE


def test_mixup_blends_neighbours_and_keeps_both_images_boxes(real_batch):
    images = torch.stack([image for image, _ in real_batch])
    targets = [target for _, target in real_batch]
    mixed, mixed_targets = mixup(images, targets, beta=0.47)
    torch.testing.assert_close(mixed[1], 0.47 * images[1] + 0.53 * images[0])
    torch.testing.assert_close(mixed[0], 0.47 * images[0] + 0.53 * images[3])
    for i, target in enumerate(mixed_targets):
        previous = targets[i - 1]
        for key in ("boxes", "labels", "area", "iscrowd"):
            assert torch.equal(target[key], torch.cat([targets[i][key], previous[key]]))
        assert torch.equal(target["image_id"], targets[i]["image_id"])


def test_collate_applies_mixup_only_inside_its_epoch_window(real_batch):
    recipe = replace(NO_MIXING, mixup_prob=1.0, multiscale_base=None)
    collate = BatchImageCollate(recipe)
    own = [len(target["boxes"]) for _, target in real_batch]
    for epoch, expected in [(3, own), (4, [n + own[i - 1] for i, n in enumerate(own)]), (64, own)]:
        collate.set_epoch(epoch)
        assert [len(target["boxes"]) for target in collate(real_batch)[1]] == expected


def test_copyblend_adds_at_most_three_valid_boxes_and_touches_only_their_surroundings(real_batch):
    recipe = replace(NO_MIXING, copyblend_prob=1.0, multiscale_base=None)
    collate = BatchImageCollate(recipe)
    collate.set_epoch(10)
    originals = torch.stack([image for image, _ in real_batch])
    pool_labels = {
        label
        for _, target in real_batch
        for label, area in zip(target["labels"].tolist(), target["area"].tolist(), strict=True)
        if area >= 100
    }
    added_total = 0
    for seed in range(5):
        random.seed(seed)
        images, targets = collate(real_batch)
        for i, (target, (_, source)) in enumerate(zip(targets, real_batch, strict=True)):
            own = len(source["boxes"])
            added = target["boxes"][own:]
            assert 0 <= len(added) <= 3 and torch.equal(target["boxes"][:own], source["boxes"])
            assert len(target["labels"]) == len(target["area"]) == len(target["iscrowd"]) == len(target["boxes"])
            assert set(target["labels"][own:].tolist()) <= pool_labels
            _assert_valid_normalized(added)
            # Outside every pasted box grown by its largest expansion (25 %) the image is untouched.
            untouched = torch.ones(SIZE, SIZE, dtype=torch.bool)
            for x1, y1, x2, y2 in (box_cxcywh_to_xyxy(added) * SIZE).tolist():
                grow_x, grow_y = 0.25 * (x2 - x1) + 1, 0.25 * (y2 - y1) + 1
                untouched[
                    max(int(y1 - grow_y), 0) : int(y2 + grow_y) + 1, max(int(x1 - grow_x), 0) : int(x2 + grow_x) + 1
                ] = False
            assert torch.equal(images[i][:, untouched], originals[i][:, untouched])
            added_total += len(added)
    assert added_total > 0


def test_copyblend_blends_source_pixels_with_the_first_beta():
    images = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64)])
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]]), "labels": torch.tensor([1]), "area": torch.tensor([50.0])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.25, 0.25]]), "labels": torch.tensor([2]), "area": torch.tensor([300.0])},
    ]
    random.seed(0)
    blended, new_targets = copy_blend(images, targets, beta=0.52)
    assert [t["labels"].tolist() for t in new_targets] == [[1, 2], [2, 2]]  # only the 300-pixel object is in the pool
    x1, y1, x2, y2 = (box_cxcywh_to_xyxy(new_targets[0]["boxes"][1]) * 64).round().int().tolist()
    assert (x2 - x1, y2 - y1) == (16, 16)
    torch.testing.assert_close(blended[0, :, y1:y2, x1:x2], torch.full((3, 16, 16), 0.48))
    assert torch.equal(blended[1], images[1])  # blending ones into ones changes nothing
    assert copy_blend(images, [{**t, "area": torch.tensor([10.0])} for t in targets], beta=0.5)[0] is images
