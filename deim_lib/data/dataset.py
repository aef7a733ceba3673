"""COCO-format detection dataset with early, readable validation of the annotation file and image folder.

Items are ``(image, target)``: a PIL RGB image (or whatever the transform pipeline makes of it) and a dict of tensors.
Before any transform, ``target["boxes"]`` is a ``tv_tensors.BoundingBoxes`` in XYXY pixels of the original image.
"""

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from faster_coco_eval import COCO
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from deim_lib.errors import UserError

__all__ = ["CocoDetection", "DatasetError"]

logger = logging.getLogger(__name__)

# Error messages list at most this many offending ids / names so they stay one line.
_MAX_LISTED = 5
# Image headers read at start-up to compare with the file's width/height: enough to catch a wrong tool, cheap for 100k.
_SIZES_CHECKED = 200
_REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


class DatasetError(UserError):
    """A dataset file is missing or malformed; the one-line message names the file and the fix."""


class CocoDetection(torch.utils.data.Dataset):
    """Every image of a COCO instances file (images without boxes included), crowd annotations dropped.

    Category ids map to contiguous labels ``0..K-1`` in sorted id order (for COCO's 80 classes this is DEIMv2's
    label order). ``transforms`` is called as ``transforms(image, target, epoch)`` and returns ``(image, target)``;
    the pipelines of ``deim_lib.data.transforms`` use the epoch for their augmentation policy.

    Target before transforms:
        boxes: ``tv_tensors.BoundingBoxes`` [N, 4] float32, XYXY pixels, clipped to the image, canvas (H, W).
        labels: int64 [N]. area: float32 [N] (COCO "area", original pixels). iscrowd: int64 [N] (all zero).
        image_id: int64 [1]. orig_size: int64 [2] = (W, H). idx: int64 [1] (dataset index).

    Attributes:
        coco: the faster-coco-eval ``COCO`` object of the annotation file.
        category_ids: label → COCO category id. class_names: label → category name.
        epoch: set by ``set_epoch``; -1 until then.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.epoch = -1

        content = _read_annotation_json(self.annotation_file)
        _check_annotations(content, self.annotation_file)
        self.coco = COCO(content)
        self.category_ids = sorted(self.coco.cats)
        self.class_names = [self.coco.cats[category_id]["name"] for category_id in self.category_ids]
        self._label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        self.image_ids = sorted(self.coco.imgs)

        if class_names is not None and list(class_names) != self.class_names:
            raise DatasetError(
                f"{self.annotation_file}: class names {list(class_names)} differ from the dataset's categories "
                f"{self.class_names}; pass the dataset's names in category-id order or fix the configuration"
            )
        self._check_image_files()
        self._report_wrong_image_sizes()
        self._report_degenerate_boxes()

    def set_epoch(self, epoch: int) -> None:
        """Epoch read by the augmentation policy of the transform pipeline."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Image.Image | Tensor, dict[str, Tensor]]:
        image_id = self.image_ids[index]
        image = self._load_image(self.coco.imgs[image_id]["file_name"])
        target = self._build_target(index, image_id, image.size)
        if self.transforms is not None:
            image, target = self.transforms(image, target, self.epoch)
        return image, target

    def _load_image(self, file_name: str) -> Image.Image:
        path = self.images_dir / file_name
        try:
            # COCO holds some grayscale images, other datasets RGBA/palette images; the model always takes 3 channels.
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL decodes lazily, in convert()
            raise DatasetError(
                f"{path}: cannot read the image ({error}); replace the file or remove it from {self.annotation_file}"
            ) from None

    def _build_target(self, index: int, image_id: int, size: tuple[int, int]) -> dict[str, Tensor]:
        width, height = size
        annotations = [
            ann for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])) if not ann.get("iscrowd", 0)
        ]
        xywh = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = _clipped_xyxy(xywh, torch.tensor([width, height]))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self._label_of[ann["category_id"]] for ann in annotations], dtype=torch.int64)
        area = torch.tensor([_annotation_area(ann) for ann in annotations], dtype=torch.float32)
        labels, area = labels[keep], area[keep]
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels,
            "image_id": torch.tensor([image_id], dtype=torch.int64),
            "area": area,
            "iscrowd": torch.zeros_like(labels),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
            "idx": torch.tensor([index], dtype=torch.int64),
        }

    def _check_image_files(self) -> None:
        if not self.images_dir.is_dir():
            raise DatasetError(f"{self.images_dir}: image folder not found; point images_dir at the image directory")
        # One directory listing instead of one stat per image keeps this fast for 100k+ images.
        present = {path.name for path in self.images_dir.iterdir()}
        file_names = [self.coco.imgs[image_id]["file_name"] for image_id in self.image_ids]
        missing = [name for name in file_names if name not in present and not (self.images_dir / name).is_file()]
        if missing:
            raise DatasetError(
                f"{self.images_dir}: {len(missing)} image files listed in {self.annotation_file.name} are missing "
                f"(first: {missing[:_MAX_LISTED]}); copy the images or fix images_dir"
            )

    def _report_wrong_image_sizes(self) -> None:
        """Warn once when the file's width/height disagree with the images' (targets always use the real size)."""
        step = max(1, len(self.image_ids) // _SIZES_CHECKED)
        checked = self.image_ids[::step][:_SIZES_CHECKED]
        wrong = []
        for image_id in checked:
            entry = self.coco.imgs[image_id]
            try:
                with Image.open(self.images_dir / entry["file_name"]) as image:  # reads the header only
                    size = image.size
            except (OSError, ValueError):
                continue  # an unreadable image is reported, with its path, when it is loaded
            if size != (entry["width"], entry["height"]):
                wrong.append((entry["file_name"], (entry["width"], entry["height"]), size))
        if wrong:
            name, listed, real = wrong[0]
            logger.warning(
                "%s: %d of %d images checked have another width/height than the file says (e.g. %s: %s in the file, "
                "%s in the image); training uses the real sizes; fix the file, other tools trust it",
                self.annotation_file,
                len(wrong),
                len(checked),
                name,
                "×".join(map(str, listed)),
                "×".join(map(str, real)),
            )

    def _report_degenerate_boxes(self) -> None:
        annotations = [ann for ann in self.coco.loadAnns(self.coco.getAnnIds()) if not ann.get("iscrowd", 0)]
        if not annotations:
            return
        xywh = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32)
        sizes = torch.tensor(
            [[self.coco.imgs[ann["image_id"]][key] for key in ("width", "height")] for ann in annotations]
        )
        xyxy = _clipped_xyxy(xywh, sizes)
        count = int(((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])).sum())
        if count:
            logger.warning(
                "%s: %d degenerate boxes (zero width or height inside the image) are skipped",
                self.annotation_file,
                count,
            )


def _clipped_xyxy(xywh: Tensor, size: Tensor) -> Tensor:
    """COCO [x, y, w, h] pixels [N, 4] → XYXY pixels clipped to [0, W] × [0, H]; ``size`` is (W, H) as [2] or [N, 2]."""
    upper = size.to(xywh.dtype).expand(len(xywh), 2)
    top_left = torch.minimum(xywh[:, :2].clamp(min=0), upper)
    bottom_right = torch.minimum((xywh[:, :2] + xywh[:, 2:]).clamp(min=0), upper)
    return torch.cat([top_left, bottom_right], dim=1)


def _annotation_area(ann: dict[str, Any]) -> float:
    # Converted datasets may omit "area"; the box area is the natural stand-in.
    return float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))


def _read_annotation_json(path: Path) -> dict[str, Any]:
    fix = "point it at a COCO instances JSON file"
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: cannot read annotations ({error}); {fix}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: top level is {type(content).__name__}, expected an object; {fix}")
    for key in ("images", "categories"):
        if not isinstance(content.get(key), list):
            raise DatasetError(f"{path}: missing '{key}' list; {fix}")
    if not isinstance(content.setdefault("annotations", []), list):
        raise DatasetError(f"{path}: 'annotations' is not a list; {fix}")
    return content


def _check_annotations(content: dict[str, Any], path: Path) -> None:
    """Raise DatasetError for entries faster-coco-eval would index silently or crash on later."""
    for key, entries, fields in (
        ("images", content["images"], ("id", "file_name", "width", "height")),
        ("categories", content["categories"], ("id", "name")),
        ("annotations", content["annotations"], _REQUIRED_ANNOTATION_KEYS),
    ):
        incomplete = [index for index, entry in enumerate(entries) if not all(field in entry for field in fields)]
        if incomplete:
            raise DatasetError(
                f"{path}: {len(incomplete)} '{key}' entries lack one of {list(fields)} "
                f"(first positions: {incomplete[:_MAX_LISTED]}); complete or remove them"
            )
    image_ids = [image["id"] for image in content["images"]]
    if len(set(image_ids)) != len(image_ids):
        raise DatasetError(f"{path}: duplicate image ids; give every image a unique id")
    known_images, known_categories = set(image_ids), {category["id"] for category in content["categories"]}
    annotations = content["annotations"]
    unknown_images = sorted({ann["image_id"] for ann in annotations} - known_images)
    if unknown_images:
        raise DatasetError(
            f"{path}: annotations refer to {len(unknown_images)} unknown image ids "
            f"(first: {unknown_images[:_MAX_LISTED]}); add those images or remove their annotations"
        )
    unknown_categories = sorted({ann["category_id"] for ann in annotations} - known_categories)
    if unknown_categories:
        raise DatasetError(
            f"{path}: annotations refer to unknown category ids {unknown_categories[:_MAX_LISTED]}; "
            f"add them to 'categories' or remove those annotations"
        )
    bad_boxes = [ann["id"] for ann in annotations if not _is_finite_box(ann["bbox"])]
    if bad_boxes:
        raise DatasetError(
            f"{path}: {len(bad_boxes)} annotations have a bbox that is not 4 finite numbers "
            f"(first ids: {bad_boxes[:_MAX_LISTED]}); fix or remove them"
        )


def _is_finite_box(bbox: Any) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(value, (int, float)) and math.isfinite(value) for value in bbox)
    )
