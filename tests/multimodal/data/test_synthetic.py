"""The synthetic surface-defect dataset: determinism, tight large boxes, class coverage and distinct looks."""

import itertools
import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from multimodal.data.synthetic import CLASS_DESCRIPTIONS, CLASS_NAMES, generate, main, paste, sample_defect


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    paths = generate(root)
    print(f"synthetic dataset with default settings (300 + 80 images, 256 px): {time.perf_counter() - start:.2f} s")
    return {split: json.loads(paths[f"{split}_annotations"].read_text()) for split in ("train", "val")}, paths


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    generate(tmp_path / "a", seed=3, num_train=6, num_val=5, image_size=128)
    generate(tmp_path / "b", seed=3, num_train=6, num_val=5, image_size=128)
    generate(tmp_path / "c", seed=4, num_train=6, num_val=5, image_size=128)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 6 + 5 + 2
    assert first == again
    assert first.keys() == other.keys()
    assert first["annotations/train.json"] != other["annotations/train.json"]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_box_is_tight_around_the_pixels_a_defect_draws_on_a_blank_canvas(name):
    rng = np.random.default_rng(11)
    for _ in range(10):
        defect = sample_defect(name, rng, 256)
        canvas = np.zeros((256, 256, 3), dtype=np.float32)
        paste(canvas, defect)
        rows, cols = np.nonzero(canvas.max(axis=2) > 0.0)
        expected = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        assert defect.bbox == [float(v) for v in expected]
        assert min(defect.bbox[2:]) >= 0.15 * 256


def test_classes_differ_in_colour_and_stand_out_from_steel():
    rng = np.random.default_rng(5)
    mean_colour = {}
    for name in CLASS_NAMES:
        defect = sample_defect(name, rng, 256)
        mean_colour[name] = np.array(defect.color)
        assert defect.alpha[defect.alpha > 0].mean() > 0.5  # opaque enough to see
    for a, b in itertools.combinations(CLASS_NAMES, 2):
        assert np.linalg.norm(mean_colour[a] - mean_colour[b]) > 60, (a, b)
    steel = np.array([140.0, 140.0, 140.0])
    assert all(np.linalg.norm(colour - steel) > 80 for colour in mean_colour.values())
    assert mean_colour["scratch"].min() > 200 and mean_colour["crack"].max() < 50


def test_default_dataset_has_every_class_in_both_splits_with_descriptions(default_dataset):
    datasets, paths = default_dataset
    assert [len(datasets[split]["images"]) for split in ("train", "val")] == [300, 80]
    for data in datasets.values():
        assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(CLASS_NAMES, start=1))
        assert all(c["description"] == CLASS_DESCRIPTIONS[c["name"]] for c in data["categories"])
        per_class = Counter(a["category_id"] for a in data["annotations"])
        assert set(per_class) == {1, 2, 3, 4, 5}
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert set(per_image.values()) <= {1, 2, 3} and len(per_image) == len(data["images"])
    with Image.open(paths["val_images"] / datasets["val"]["images"][0]["file_name"]) as image:
        assert image.size == (256, 256) and image.mode == "RGB"


def test_default_dataset_boxes_are_large_inside_and_disjoint(default_dataset):
    datasets, _ = default_dataset
    for data in datasets.values():
        boxes_by_image: dict[int, list] = {}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert min(w, h) >= 0.15 * 256 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256
            assert ann["area"] == w * h
            boxes_by_image.setdefault(ann["image_id"], []).append((x, y, x + w, y + h))
        for boxes in boxes_by_image.values():
            for a, b in itertools.combinations(boxes, 2):
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_cli_writes_the_requested_layout(tmp_path, capsys):
    assert main(["--output", str(tmp_path), "--seed", "1", "--train", "5", "--val", "5", "--size", "96"]) == 0
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 5
    val = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert {img["width"] for img in val["images"]} == {96}
    assert "5 train + 5 val" in capsys.readouterr().out
