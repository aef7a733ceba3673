"""VOC → COCO conversion on NEU-DET and on small hand-made folders, and the stratified split."""

import json
import re
from collections import Counter

import pytest
from PIL import Image

from multimodal.data.voc2coco import convert, main, primary_categories, split

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


@pytest.fixture(scope="module")
def neu_dir(datasets_dir):
    return datasets_dir / "neu-det"


@pytest.fixture(scope="module")
def neu_coco(neu_dir):
    return convert(neu_dir / "images", neu_dir / "annotations")


def test_neu_det_converts_every_image_and_object(neu_dir, neu_coco):
    xml_texts = [p.read_text() for p in sorted((neu_dir / "annotations").glob("*.xml"))]
    object_count = sum(len(re.findall(r"<object>", text)) for text in xml_texts)

    assert len(neu_coco["images"]) == 1560
    assert len(neu_coco["annotations"]) == object_count == 3603
    assert [c["name"] for c in neu_coco["categories"]] == NEU_CLASSES
    assert [c["id"] for c in neu_coco["categories"]] == [1, 2, 3, 4, 5, 6]
    assert neu_coco["info"]["skipped"] == {"images_without_xml": [], "xml_without_image": [], "objects": 0}
    # XML <filename> lacks ".jpg" in 174 files; pairing by stem still gives every image its boxes
    assert {a["image_id"] for a in neu_coco["annotations"]} == {img["id"] for img in neu_coco["images"]}


def test_neu_det_boxes_lie_inside_their_real_image_size(neu_dir, neu_coco):
    images = {img["id"]: img for img in neu_coco["images"]}
    assert {(img["width"], img["height"]) for img in images.values()} == {(200, 200)}
    with Image.open(neu_dir / "images" / neu_coco["images"][0]["file_name"]) as image:
        assert image.mode == "RGB"  # the XML says depth 1, the JPEG is 3-channel
    for ann in neu_coco["annotations"]:
        x, y, w, h = ann["bbox"]
        img = images[ann["image_id"]]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= img["width"] and y + h <= img["height"]
        assert ann["area"] == w * h and ann["iscrowd"] == 0


def test_voc_corners_become_zero_based_xywh(neu_coco):
    # crazing_1.xml: xmin 2, ymin 2, xmax 193, ymax 194 (1-based, inclusive)
    image_id = next(img["id"] for img in neu_coco["images"] if img["file_name"] == "crazing_1.jpg")
    boxes = [a["bbox"] for a in neu_coco["annotations"] if a["image_id"] == image_id]
    assert boxes == [[1.0, 1.0, 192.0, 193.0]]


def _voc_xml(objects: list[tuple[str, tuple]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    return f"<annotation><size><width>1</width><height>1</height><depth>1</depth></size>{body}</annotation>"


def test_unpaired_files_and_unusable_objects_are_skipped_and_reported(tmp_path, capsys):
    images, xmls = tmp_path / "img", tmp_path / "xml"
    images.mkdir()
    xmls.mkdir()
    for stem in ("a", "b", "lonely"):
        Image.new("RGB", (40, 30)).save(images / f"{stem}.png")
    (xmls / "a.xml").write_text(_voc_xml([("dent", (1, 1, 40, 30)), ("", (1, 1, 5, 5)), ("rust", (9, 9, 3, 3))]))
    (xmls / "b.xml").write_text(_voc_xml([("rust", (30, 20, 60, 50))]))  # clipped to the 40×30 image
    (xmls / "orphan.xml").write_text(_voc_xml([("dent", (1, 1, 2, 2))]))

    warnings = []
    coco = convert(images, xmls, warn=warnings.append)

    assert [line.split(",")[0] for line in warnings] == [  # each class is in one file only
        "warning: class 'dent' has 1 object(s)",
        "warning: class 'rust' has 1 object(s)",
    ]
    assert [img["file_name"] for img in coco["images"]] == ["a.png", "b.png"]
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "dent"), (2, "rust")]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]] == [
        (1, 1, [0.0, 0.0, 40.0, 30.0]),
        (2, 2, [29.0, 19.0, 11.0, 11.0]),
    ]
    assert coco["info"]["skipped"] == {
        "images_without_xml": ["lonely.png"],
        "xml_without_image": ["orphan.xml"],
        "objects": 2,
    }

    assert main(["--images", str(images), "--annotations", str(xmls), "--output", str(tmp_path / "out.json")]) == 0
    summary, written = capsys.readouterr().out.strip().splitlines()
    assert written == f"{tmp_path / 'out.json'}: 2 images, 2 boxes"
    assert "lonely.png" in summary and "orphan.xml" in summary and "objects without class or box 2" in summary
    assert json.loads((tmp_path / "out.json").read_text())["annotations"] == coco["annotations"]


def test_folders_without_pairs_are_an_error_naming_both_folders(tmp_path, capsys):
    images, xmls = tmp_path / "img", tmp_path / "xml"
    images.mkdir()
    xmls.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.png")
    (xmls / "b.xml").write_text(_voc_xml([("dent", (1, 1, 2, 2))]))
    for first, second in ((images, xmls), (xmls, images)):  # unpaired, then swapped
        assert main(["--images", str(first), "--annotations", str(second), "--output", str(tmp_path / "o.json")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: no image/XML pairs") and "the right folders" in error and "\n" not in error
    assert not (tmp_path / "o.json").exists()


def test_a_misspelt_class_is_an_error_with_classes_and_a_warning_without(tmp_path, capsys):
    images, xmls = tmp_path / "img", tmp_path / "xml"
    images.mkdir()
    xmls.mkdir()
    for index in range(11):
        Image.new("RGB", (40, 30)).save(images / f"{index}.png")
        name = "scratch" if index else "scrach"
        (xmls / f"{index}.xml").write_text(_voc_xml([(name, (1, 1, 20, 20)), ("pit", (5, 5, 9, 9))]))
    warnings = []
    coco = convert(images, xmls, warn=warnings.append)
    assert [c["name"] for c in coco["categories"]] == ["pit", "scrach", "scratch"]
    assert warnings == [
        "warning: class 'scrach' has 1 object(s), only in 0.xml, against a median of 10 per class: a misspelling of "
        "'scratch'? pass --classes to fix the class list"
    ]
    arguments = ["--images", str(images), "--annotations", str(xmls), "--output", str(tmp_path / "o.json")]
    assert main([*arguments, "--classes", "scratch,pit"]) == 2
    assert (
        "0.xml: class 'scrach' is not in --classes ['scratch', 'pit']; did you mean 'scratch'?"
        in capsys.readouterr().err
    )
    (xmls / "0.xml").write_text(_voc_xml([("scratch", (1, 1, 20, 20))]))
    assert main([*arguments, "--classes", "scratch,pit"]) == 0
    categories = json.loads((tmp_path / "o.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in categories] == [(1, "scratch"), (2, "pit")]  # the order given


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(
        ["--images", str(tmp_path / "none"), "--annotations", str(tmp_path), "--output", str(tmp_path / "o.json")]
    )
    assert code == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    images, xmls = tmp_path / "img", tmp_path / "xml"
    images.mkdir()
    xmls.mkdir()
    Image.new("RGB", (40, 30)).save(images / "a.png")
    (xmls / "a.xml").write_text(_voc_xml([("dent", (1, 1, 20, 20))]))
    (tmp_path / "taken").write_text("a file")
    arguments = ["--images", str(images), "--annotations", str(xmls), "--output"]
    assert main([*arguments, str(tmp_path / "taken" / "o.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output") and f"{tmp_path / 'taken'} is a file" in error and "\n" not in error
    (tmp_path / "o_train.json").mkdir()  # a folder where a split file goes
    assert main([*arguments, str(tmp_path / "o.json"), "--val-fraction", "0.5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error == f"error: --output {tmp_path / 'o_train.json'}: is a folder; pass the path of the .json file to write"
    )


def test_split_is_stratified_by_primary_class_within_one_image(neu_coco):
    _, val = split(neu_coco, 0.2, seed=0)
    primary = primary_categories(neu_coco)
    all_counts = Counter(primary.values())
    val_counts = Counter(primary[img["id"]] for img in val["images"])
    assert set(all_counts) == {1, 2, 3, 4, 5, 6}
    for category, total in all_counts.items():
        assert abs(val_counts[category] - 0.2 * total) <= 1


def test_split_is_disjoint_complete_and_keeps_annotations_with_their_images(neu_coco):
    train, val = split(neu_coco, 0.25, seed=3)
    train_ids = {img["id"] for img in train["images"]}
    val_ids = {img["id"] for img in val["images"]}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {img["id"] for img in neu_coco["images"]}
    assert {a["image_id"] for a in val["annotations"]} <= val_ids
    assert len(train["annotations"]) + len(val["annotations"]) == len(neu_coco["annotations"])
    assert train["categories"] == val["categories"] == neu_coco["categories"]


def test_split_is_deterministic_for_a_seed(neu_coco):
    first = split(neu_coco, 0.2, seed=7)[1]["images"]
    assert split(neu_coco, 0.2, seed=7)[1]["images"] == first
    assert split(neu_coco, 0.2, seed=8)[1]["images"] != first


def test_primary_class_is_the_most_frequent_with_ties_to_the_lower_id():
    coco = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "annotations": [
            {"image_id": 1, "category_id": 4},
            {"image_id": 1, "category_id": 2},
            {"image_id": 1, "category_id": 4},
            {"image_id": 2, "category_id": 5},
            {"image_id": 2, "category_id": 3},
        ],
    }
    assert primary_categories(coco) == {1: 4, 2: 3, 3: 0}


def test_cli_split_writes_train_and_val_files(neu_dir, tmp_path):
    output = tmp_path / "neu.json"
    args = ["--images", str(neu_dir / "images"), "--annotations", str(neu_dir / "annotations"), "--output", str(output)]
    assert main([*args, "--val-fraction", "0.1", "--seed", "5"]) == 0
    train = json.loads((tmp_path / "neu_train.json").read_text())
    val = json.loads((tmp_path / "neu_val.json").read_text())
    assert not output.exists()
    assert len(train["images"]) + len(val["images"]) == 1560
    assert 150 <= len(val["images"]) <= 162


def test_a_class_unlike_any_other_is_reported_when_rare_or_in_one_file(tmp_path):
    images, xmls = tmp_path / "img", tmp_path / "xml"
    images.mkdir()
    xmls.mkdir()
    for index in range(40):
        Image.new("RGB", (40, 30)).save(images / f"{index}.png")
        objects = [("scratch", (1, 1, 20, 20)), ("pit", (5, 5, 9, 9))]
        objects += [("dent", (2, 2, 8, 8))] if index == 7 else []
        objects += [("crack", (3, 3, 9, 9))] if index in (3, 4) else []
        (xmls / f"{index}.xml").write_text(_voc_xml(objects))
    warnings = []
    convert(images, xmls, warn=warnings.append)
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: class 'crack' has 2 object(s), in 2 files (e.g. 3.xml), against a median")
    assert warnings[1].startswith("warning: class 'dent' has 1 object(s), only in 7.xml, against a median of 21 per")
    assert "pass --classes" in warnings[1]


def test_neu_det_converts_without_a_class_warning(neu_dir):
    warnings = []
    convert(neu_dir / "images", neu_dir / "annotations", warn=warnings.append)
    assert warnings == []
