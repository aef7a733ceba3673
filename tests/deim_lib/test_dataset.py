"""CocoDetection: targets on real COCO data, label mapping, image modes and every early DatasetError."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from deim_lib.data.dataset import CocoDetection, DatasetError


@pytest.fixture(scope="module")
def coco_tiny(datasets_dir) -> tuple[Path, Path]:
    root = datasets_dir / "coco-tiny"
    return root / "train2017", root / "annotations" / "instances_train2017.json"


def test_coco_tiny_targets_match_the_json_with_crowd_dropped(coco_tiny):
    images_dir, annotation_file = coco_tiny
    content = json.loads(annotation_file.read_text())
    dataset = CocoDetection(images_dir, annotation_file)
    category_ids = sorted(category["id"] for category in content["categories"])
    images = {image["id"]: image for image in content["images"]}
    assert len(dataset) == len(images) == 80
    assert dataset.category_ids == category_ids and len(dataset.class_names) == 80

    total_boxes = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        info = images[image_id]
        annotations = [ann for ann in content["annotations"] if ann["image_id"] == image_id and not ann["iscrowd"]]
        assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        assert target["orig_size"].tolist() == [info["width"], info["height"]]
        assert target["orig_size"].dtype == torch.int64 and int(target["idx"]) == index
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
        assert target["boxes"].canvas_size == (info["height"], info["width"])
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [category_ids.index(ann["category_id"]) for ann in annotations]
        expected = torch.tensor([ann["bbox"] for ann in annotations]).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
        torch.testing.assert_close(target["area"], torch.tensor([float(ann["area"]) for ann in annotations]))
        assert target["iscrowd"].tolist() == [0] * len(annotations)
        total_boxes += len(target["boxes"])
    crowd = sum(ann["iscrowd"] for ann in content["annotations"])
    assert crowd > 0 and total_boxes == len(content["annotations"]) - crowd


def _write_dataset(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    """Writes the JSON and a small real-looking image for every listed image that has a 'mode'."""
    root.mkdir(exist_ok=True)
    for image in images:
        if "mode" in image:
            color = {"RGB": (10, 200, 30), "L": 120, "RGBA": (10, 200, 30, 7), "P": 3}[image["mode"]]
            Image.new(image["mode"], (image["width"], image["height"]), color).save(root / image["file_name"])
    path = root / "annotations.json"
    entries = [{key: value for key, value in image.items() if key != "mode"} for image in images]
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def _image(image_id: int, mode: str = "RGB") -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "width": 40, "height": 30, "mode": mode}


def _box(ann_id: int, image_id: int, category_id: int, bbox: list, iscrowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": 50.0,
        "iscrowd": iscrowd,
    }


CATEGORIES = [{"id": 11, "name": "gear"}, {"id": 3, "name": "bolt"}, {"id": 7, "name": "nut"}]


def test_labels_are_contiguous_in_sorted_category_id_order_and_edge_cases_load(tmp_path, caplog):
    annotations = [
        _box(1, 1, 11, [1, 2, 10, 8]),
        _box(2, 1, 3, [5, 5, 4, 4]),
        _box(3, 1, 7, [0, 0, 40, 30], iscrowd=1),
        _box(4, 2, 7, [2, 2, 0, 5]),  # zero width
        _box(5, 2, 7, [45, 2, 5, 5]),  # entirely right of the 40-pixel-wide image
        _box(6, 2, 3, [30, 20, 20, 20]),  # clipped to the image
    ]
    images = [_image(1, "L"), _image(2, "RGBA"), _image(3, "P")]
    path = _write_dataset(tmp_path, images, annotations, CATEGORIES)
    with caplog.at_level(logging.WARNING, logger="deim_lib.data.dataset"):
        dataset = CocoDetection(tmp_path, path)
    assert [record.getMessage().count("2 degenerate boxes") for record in caplog.records] == [1]
    assert dataset.category_ids == [3, 7, 11] and dataset.class_names == ["bolt", "nut", "gear"]

    items = [dataset[index] for index in range(3)]
    assert all(image.mode == "RGB" for image, _ in items)
    assert items[0][0].getpixel((0, 0)) == (120, 120, 120)
    first, second, empty = (target for _, target in items)
    assert first["labels"].tolist() == [2, 0]  # crowd annotation dropped
    assert second["labels"].tolist() == [0]
    assert second["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_transforms_receive_the_dataset_epoch(tmp_path):
    path = _write_dataset(tmp_path, [_image(1)], [_box(1, 1, 3, [1, 1, 5, 5])], CATEGORIES)
    seen = []

    def record(image, target, epoch):
        seen.append(epoch)
        return image, target

    dataset = CocoDetection(tmp_path, path, transforms=record)
    dataset[0]
    dataset.set_epoch(12)
    dataset[0]
    assert seen == [-1, 12]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read annotations"),
        ("[1, 2]", "top level is list"),
        ('{"images": [], "annotations": []}', "missing 'categories'"),
    ],
)
def test_unreadable_annotation_json_is_a_dataset_error(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        CocoDetection(tmp_path, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_annotation_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere\.json: cannot read annotations"):
        CocoDetection(tmp_path, tmp_path / "nowhere.json")


def test_missing_image_files_are_listed(tmp_path):
    images = [_image(1), *({k: v for k, v in _image(i).items() if k != "mode"} for i in range(2, 10))]
    path = _write_dataset(tmp_path, images, [], CATEGORIES)
    with pytest.raises(DatasetError, match=r"8 image files .* missing \(first: \['2.png', '3.png', '4.png'"):
        CocoDetection(tmp_path, path)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (_box(1, 99, 3, [1, 1, 5, 5]), r"unknown image ids \(first: \[99\]\)"),
        (_box(1, 1, 4, [1, 1, 5, 5]), r"unknown category ids \[4\]"),
        (_box(1, 1, 3, [1, float("nan"), 5, 5]), r"not 4 finite numbers \(first ids: \[1\]\)"),
        (_box(1, 1, 3, [1, 1, 5]), "not 4 finite numbers"),
        ({"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5]}, "lack one of"),
    ],
)
def test_broken_annotations_are_dataset_errors(tmp_path, annotation, message):
    path = _write_dataset(tmp_path, [_image(1)], [annotation], CATEGORIES)
    with pytest.raises(DatasetError, match=message):
        CocoDetection(tmp_path, path)


def test_duplicate_image_ids_are_a_dataset_error(tmp_path):
    path = _write_dataset(tmp_path, [_image(1), _image(1)], [], CATEGORIES)
    with pytest.raises(DatasetError, match="duplicate image ids"):
        CocoDetection(tmp_path, path)


def test_class_names_that_differ_from_the_categories_list_both(tmp_path):
    path = _write_dataset(tmp_path, [_image(1)], [], CATEGORIES)
    with pytest.raises(DatasetError, match=r"\['bolt', 'gear', 'nut'\] differ .* \['bolt', 'nut', 'gear'\]"):
        CocoDetection(tmp_path, path, class_names=["bolt", "gear", "nut"])
    assert CocoDetection(tmp_path, path, class_names=("bolt", "nut", "gear")).class_names == ["bolt", "nut", "gear"]


def test_sizes_the_file_gets_wrong_are_reported_once_and_the_real_size_is_used(tmp_path, caplog):
    images = [_image(1), _image(2), _image(3)]
    path = _write_dataset(tmp_path, images, [_box(1, 2, 3, [30, 20, 20, 20])], CATEGORIES)
    content = json.loads(path.read_text())
    for entry in content["images"][1:]:
        entry["width"], entry["height"] = 512, 512  # the real images are 40 × 30
    path.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING, logger="deim_lib.data.dataset"):
        dataset = CocoDetection(tmp_path, path)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(f"{path}: 2 of 3 images checked have another width/height than the file says")
    assert "(e.g. 2.png: 512×512 in the file, 40×30 in the image)" in messages[0]
    target = dataset[1][1]
    assert target["orig_size"].tolist() == [40, 30] and target["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0]]
