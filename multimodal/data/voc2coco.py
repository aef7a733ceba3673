"""Pascal VOC XML annotations → COCO instances JSON, with an optional stratified train/val split.

Images and XML files are paired by file stem, not by the XML ``<filename>`` (NEU-DET writes it without ".jpg" in 174
files), and image sizes are read from the image itself (NEU-DET's XML claims depth 1 for 3-channel JPEGs).

Box convention: VOC corners are 1-based inclusive pixel indices, so pixel column ``xmin`` covers [xmin − 1, xmin) in
COCO's continuous coordinates. A VOC box (xmin, ymin, xmax, ymax) becomes COCO [x, y, w, h] =
[xmin − 1, ymin − 1, xmax − xmin + 1, ymax − ymin + 1], clipped to the image; ``area`` is w·h (VOC has no masks).
Class names are sorted alphabetically and numbered 1..K, or follow ``--classes`` when it is given: then any other name
in an XML file is an error naming the file (a misspelt class must not become a category of its own and renumber the
others). Without ``--classes``, a class found in one file only, or with under a tenth of the median class's objects,
is reported with a file that uses it.

Command line::

    python -m multimodal.data.voc2coco --images DIR --annotations DIR --output FILE.json [--val-fraction F --seed S]
        [--classes a,b,c]

With ``--val-fraction`` it writes ``FILE_train.json`` and ``FILE_val.json`` instead of ``FILE.json``. Folders without
a single image/XML pair are an error.
"""

import argparse
import copy
import difflib
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from deim_lib.cli import HelpFormatter, make_output_dir, report
from deim_lib.errors import OutputError, UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
RARE_CLASS_FRACTION = 0.1  # a class with fewer objects than this share of the median class is reported


class ConversionError(UserError):
    """Input that cannot be converted (missing folder, unreadable XML); the message names the path."""


def _read_objects(xml_path: Path) -> tuple[list[tuple[str, list[int]]], int]:
    """(class name, [xmin, ymin, xmax, ymax]) of every usable object, and how many objects were unusable.

    An object is unusable when it has no name, a missing or non-integer corner, or xmax < xmin / ymax < ymin.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise ConversionError(f"cannot parse {xml_path}: {error}") from error
    objects, unusable = [], 0
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        try:
            corners = [int(float(obj.findtext(f"bndbox/{key}") or "")) for key in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            corners = []
        if name and corners and corners[2] >= corners[0] and corners[3] >= corners[1]:
            objects.append((name, corners))
        else:
            unusable += 1
    return objects, unusable


def _voc_to_coco_box(corners: Sequence[int], width: int, height: int) -> list[float] | None:
    """1-based inclusive VOC corners → COCO xywh clipped to the image; None when nothing is left inside."""
    x1, y1 = max(corners[0] - 1, 0), max(corners[1] - 1, 0)
    x2, y2 = min(corners[2], width), min(corners[3], height)
    if x2 <= x1 or y2 <= y1:
        return None
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def _pair_files(images_dir: Path, annotations_dir: Path) -> tuple[dict[str, tuple[Path, Path]], list[str], list[str]]:
    """Image/XML pairs by stem, plus the names of images without XML and of XML without image."""
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise ConversionError(f"not a directory: {folder}")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    xmls = {p.stem: p for p in annotations_dir.iterdir() if p.suffix.lower() == ".xml"}
    pairs = {stem: (images[stem], xmls[stem]) for stem in sorted(images.keys() & xmls.keys())}
    images_only = sorted(images[s].name for s in images.keys() - xmls.keys())
    xmls_only = sorted(xmls[s].name for s in xmls.keys() - images.keys())
    return pairs, images_only, xmls_only


def _check_class_names(parsed: dict, pairs: dict, class_names: Sequence[str] | None, warn: Callable[[str], None]):
    """The class list: ``class_names`` (every other name an error), or the names found, with rare look-alikes said."""
    files_of: dict[str, list[str]] = {}
    for stem, (objects, _) in parsed.items():
        for name in {name for name, _ in objects}:
            files_of.setdefault(name, []).append(pairs[stem][1].name)
    if class_names is not None:
        for name, files in sorted(files_of.items()):
            if name not in class_names:
                close = difflib.get_close_matches(name, class_names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConversionError(
                    f"{files[0]}: class {name!r} is not in --classes {list(class_names)}{hint} ({len(files)} files "
                    "use it); fix the XML or add the class"
                )
        return list(class_names)
    names = sorted(files_of)
    objects_of = Counter(name for objects, _ in parsed.values() for name, _ in objects)
    typical = float(np.median([objects_of[name] for name in names]))
    for name in names:
        files = files_of[name]
        rare = len(names) > 1 and objects_of[name] < RARE_CLASS_FRACTION * typical
        if len(files) > 1 and not rare:
            continue
        close = difflib.get_close_matches(name, [other for other in names if other != name], n=1, cutoff=0.6)
        hint = f"a misspelling of {close[0]!r}? " if close else ""
        where = f"only in {files[0]}" if len(files) == 1 else f"in {len(files)} files (e.g. {files[0]})"
        warn(
            f"warning: class {name!r} has {objects_of[name]} object(s), {where}, against a median of {typical:g} per "
            f"class: {hint}pass --classes to fix the class list"
        )
    return names


def convert(
    images_dir: str | Path,
    annotations_dir: str | Path,
    class_names: Sequence[str] | None = None,
    warn: Callable[[str], None] = print,
) -> dict:
    """COCO instances dict of all image/XML pairs in the two folders.

    Images get ids 1..N in stem order, ``file_name`` relative to ``images_dir`` and their real width/height;
    annotations carry ``bbox`` xywh (see the module docstring), ``area`` = w·h and ``iscrowd`` 0. Images whose objects
    are all unusable stay in as negatives. ``info["skipped"]`` lists what was left out: ``images_without_xml``,
    ``xml_without_image`` (file names) and ``objects`` (count of objects without a class or with an empty box).
    ``class_names`` fixes the categories and their order (ids 1..K); by default they are the names found, sorted.
    """
    pairs, images_only, xmls_only = _pair_files(Path(images_dir), Path(annotations_dir))
    if not pairs:
        raise ConversionError(
            f"no image/XML pairs (files of the same stem) in {images_dir} ({len(images_only)} images) and "
            f"{annotations_dir} ({len(xmls_only)} XML files); are --images and --annotations the right folders?"
        )
    parsed = {stem: _read_objects(xml_path) for stem, (_, xml_path) in pairs.items()}
    class_names = _check_class_names(parsed, pairs, class_names, warn)
    category_ids = {name: i + 1 for i, name in enumerate(class_names)}

    images, annotations, unusable = [], [], 0
    for image_id, (stem, (image_path, _)) in enumerate(pairs.items(), start=1):
        with Image.open(image_path) as image:  # reads the header only
            width, height = image.size
        images.append({"id": image_id, "file_name": image_path.name, "width": width, "height": height})
        objects, unusable_here = parsed[stem]
        unusable += unusable_here
        for name, corners in objects:
            box = _voc_to_coco_box(corners, width, height)
            if box is None:
                unusable += 1
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[name],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    skipped = {"images_without_xml": images_only, "xml_without_image": xmls_only, "objects": unusable}
    return {
        "info": {"description": f"converted from Pascal VOC in {annotations_dir}", "skipped": skipped},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_ids[name], "name": name, "supercategory": "none"} for name in class_names],
    }


def primary_categories(coco: dict) -> dict[int, int]:
    """Image id → its most frequent category id (ties → the lower id); 0 for images without annotations."""
    counts: dict[int, Counter] = {img["id"]: Counter() for img in coco["images"]}
    for ann in coco["annotations"]:
        counts[ann["image_id"]][ann["category_id"]] += 1
    return {image_id: min(c, key=lambda cat: (-c[cat], cat)) if c else 0 for image_id, c in counts.items()}


def split(coco: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    """(train, val) COCO dicts: a seeded split stratified by each image's primary category.

    Each stratum of n images sends round(n · val_fraction) of them, drawn with ``numpy.random.default_rng(seed)``, to
    val. Both dicts keep all categories and the other top-level keys; image and annotation ids are unchanged.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
    rng = np.random.default_rng(seed)
    strata: dict[int, list[int]] = {}
    for image_id, category in sorted(primary_categories(coco).items()):
        strata.setdefault(category, []).append(image_id)
    val_ids: set[int] = set()
    for category in sorted(strata):
        ids = strata[category]
        val_ids.update(int(i) for i in rng.permutation(ids)[: round(len(ids) * val_fraction)])
    return _subset(coco, lambda image_id: image_id not in val_ids), _subset(coco, val_ids.__contains__)


def _subset(coco: dict, keep: Callable[[int], bool]) -> dict:
    subset = {key: copy.deepcopy(value) for key, value in coco.items() if key not in ("images", "annotations")}
    subset["images"] = [img for img in coco["images"] if keep(img["id"])]
    subset["annotations"] = [ann for ann in coco["annotations"] if keep(ann["image_id"])]
    return subset


def _summary(coco: dict) -> str:
    skipped = coco["info"]["skipped"]

    def named(files: list[str]) -> str:
        return f"{len(files)}" + (f" ({', '.join(files[:3])}{', …' if len(files) > 3 else ''})" if files else "")

    return (
        f"{len(coco['images'])} images, {len(coco['annotations'])} boxes, {len(coco['categories'])} classes; skipped: "
        f"images without XML {named(skipped['images_without_xml'])}, XML without image "
        f"{named(skipped['xml_without_image'])}, objects without class or box {skipped['objects']}"
    )


def _write_json(data: dict, path: Path) -> None:
    """Write ``data`` to ``path`` (given as --output or named after it); a path that cannot be written is an
    ``OutputError`` naming it."""
    make_output_dir(path.parent, "--output")
    if path.is_dir():
        raise OutputError(f"--output {path}: is a folder; pass the path of the .json file to write")
    try:
        path.write_text(json.dumps(data))
    except OSError as error:
        raise OutputError(f"--output {path}: cannot write ({error.strerror}); pass another --output") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--annotations", type=Path, required=True, help="folder of VOC XML files")
    parser.add_argument("--output", type=Path, required=True, help="COCO JSON to write")
    parser.add_argument("--val-fraction", type=float, default=None, help="write <stem>_train/_val.json split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--classes", help="comma-separated class names, in category order: any other name is an error")
    args = parser.parse_args(argv)
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    class_names = [name.strip() for name in args.classes.split(",")] if args.classes else None
    try:
        make_output_dir(args.output.parent, "--output")  # before the conversion: a wrong path fails at once
        coco = convert(args.images, args.annotations, class_names, warn=lambda line: print(line, file=sys.stderr))
        print(_summary(coco))
        outputs = [(args.output, coco)]
        if args.val_fraction is not None:
            subsets = zip(("train", "val"), split(coco, args.val_fraction, args.seed), strict=True)
            outputs = [(args.output.with_name(f"{args.output.stem}_{name}.json"), subset) for name, subset in subsets]
        for path, subset in outputs:
            _write_json(subset, path)
            print(f"{path}: {len(subset['images'])} images, {len(subset['annotations'])} boxes")
    except UserError as error:
        return report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
