"""Batched inference with a trained (or official) DEIMv2 checkpoint: COCO results JSON plus one annotated PNG per image.

    python -m multimodal.tools.predict --checkpoint checkpoints/phase2_best.pth --images photos/ --output predictions/
    python -m multimodal.tools.predict --checkpoint phase2_best.pth --images val_images/ --ann val.json --output out
    python -m multimodal.tools.predict --checkpoint deimv2_atto_coco.pth --images a.jpg --output out \
        --class-names cat,dog

Accepted checkpoints: those of ``train_progressive.py`` (EMA weights when present; with text fusion from phase 1 on,
a plain detector for phase 0) and official DEIMv2 files (variant guessed from the weights, classes named ``class_k``
unless ``--class-names`` is given). Images are preprocessed exactly as in validation.

Ids, so that ``python -m deim_lib.evaluate --ann`` scores the output directly:
- ``image_id``: with ``--ann``, the id of the image of that file name in the COCO file (images it does not list are
  skipped, and said so); without, 1, 2, … in the sorted order of the input files.
- ``category_id``: the dataset's category ids stored in a phase checkpoint. For an official checkpoint, with ``--ann``
  the COCO file's category ids in sorted order (the official label order); without, label + 1.

Outputs in ``--output``:
- ``detections.json``: a standard COCO results list, the top-300 detections of every image **without** a score
  threshold (COCO evaluation needs the low-score tail). Boxes are the post-processor's, unclipped, as
  ``train_progressive.py --eval-only`` (and official DEIMv2) scores them and as the ONNX model gives them, so that
  ``deim_lib.evaluate`` on this file reports the same metrics: clipping a box that reaches past the image's edge
  changes its IoU, and moved the real DEIMv2-Atto's AP on coco-tiny from 0.278472 to 0.278487.
- ``images.json``: {"images": [{"id", "file_name" (relative to --images), "width", "height", "visualization"}],
  "categories": [{"id", "name"}]}; with an empty ``annotations`` list it is a COCO ground-truth skeleton.
- one PNG per image at its original size, with the boxes scoring at least ``--threshold`` drawn, clipped to the
  image (``visualization``); ``--draw-nms IOU`` draws only the best of the boxes of one class that overlap more.
All files are written atomically.
"""

import argparse
import functools
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import batched_nms
from tqdm import tqdm

from deim_lib.checkpoint import (
    checkpoint_image_size,
    checkpoint_num_classes,
    detector_state_dict,
    guess_variant,
    read_checkpoint,
)
from deim_lib.cli import HelpFormatter, make_output_dir, report
from deim_lib.data.transforms import build_val_transforms
from deim_lib.errors import CheckpointError, UserError
from deim_lib.evaluate import coco_results, load_ground_truth
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD, get_variant
from multimodal.files import atomic_write, atomic_write_text
from multimodal.model.assemble import ModelSpec, Weights, assemble_model, checkpoint_model
from multimodal.model.detector import MultimodalDetector
from multimodal.train.checkpoint import PhaseCheckpoint, is_phase_checkpoint

# Distinct colours, cycled by label, so neighbouring classes differ in the drawings.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230))
# DejaVu Sans, shipped with matplotlib (a dependency): the same scalable font with Latin, Greek and Cyrillic glyphs on
# every machine, whereas Pillow's default font depends on how Pillow was built.
LABEL_FONT = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
TAG_PADDING = 2  # pixels between a label's text and the edge of its tag


class InputError(UserError):
    """No usable input images, an unusable --ann file or an out-of-range flag; the message names the path or flag."""


@dataclass
class InferenceModel:
    """A detector ready for inference and what its inputs and outputs mean.

    ``model`` (eval mode, CPU) maps images float32 [B, 3, S, S] to ``pred_logits`` [B, Q, K] / ``pred_boxes``
    [B, Q, 4] (normalised cxcywh); ``postprocessor`` turns them into per-image ``labels`` int64, ``boxes`` float32
    xyxy pixels and ``scores`` for the given (width, height). ``normalize`` = (mean, std) for the DINOv3 variants.
    ``category_ids``: the dataset's category id of each label, None when the checkpoint does not know them.
    """

    model: MultimodalDetector
    postprocessor: PostProcessor
    class_names: list[str]
    image_size: int
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    variant: str
    category_ids: list[int] | None = None

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL RGB image → float32 [3, S, S], as validation does: bilinear resize on PIL, [0, 1], optional mean/std."""
        tensor, _ = build_val_transforms(self.image_size, self.normalize)(image, {})
        return tensor.as_subclass(Tensor)


def load_for_inference(path: str | Path, class_names: Sequence[str] | None = None) -> InferenceModel:
    """Read a checkpoint of ``train_progressive.py`` or an official DEIMv2 one into an eval-mode model.

    ``class_names`` replaces the checkpoint's names (official checkpoints have none); their count must match. Every
    problem with the file is a ``CheckpointError`` naming it.
    """
    data = read_checkpoint(path)
    if is_phase_checkpoint(data):
        checkpoint = PhaseCheckpoint.from_dict(data, path)
        model, info = checkpoint_model(checkpoint, path), checkpoint.info
        names, image_size, category_ids = list(info.class_names), info.image_size, list(info.category_ids)
    else:
        state_dict, _ = detector_state_dict(data, path)
        variant = guess_variant(state_dict)
        if variant is None:
            raise CheckpointError(f"{path}: the weights match no DEIMv2 variant; is this a DEIMv2 detector checkpoint?")
        image_size = checkpoint_image_size(state_dict, variant)
        names, category_ids = [f"class_{k}" for k in range(checkpoint_num_classes(state_dict))], None
        model = assemble_model(ModelSpec(get_variant(variant), names, image_size), Weights(str(path), state_dict)).model
    if class_names is not None:
        if len(class_names) != len(names):
            raise CheckpointError(f"{path}: has {len(names)} classes, but {len(class_names)} class names were given")
        names = list(class_names)
    variant = get_variant(model.detector.variant)
    normalize = (IMAGENET_MEAN, IMAGENET_STD) if variant.imagenet_normalize else None
    return InferenceModel(
        model.eval(), PostProcessor(len(names)), names, image_size, normalize, variant.name, category_ids
    )


def find_images(path: Path, exclude: Path | None = None) -> list[Path]:
    """``path`` itself, or the files under the folder ``path`` with an extension PIL can read, sorted.

    Files inside ``exclude`` (the output folder, which may lie inside ``path``) are left out: a rerun must not read
    the previous run's drawings as inputs.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder; pass an image or a folder of images with --images")
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    excluded = exclude.resolve() if exclude is not None else None
    images = sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in extensions and excluded not in file.resolve().parents
    )
    if not images:
        raise InputError(f"{path}: no image files found (looked for {', '.join(sorted(extensions)[:6])}, …)")
    return images


def visualization_names(relative_paths: Sequence[Path]) -> list[Path]:
    """``a/b.jpg`` → ``a/b.png``; when two inputs share a stem (``b.jpg``, ``b.png``) both keep their suffix."""
    stems = Counter(path.with_suffix("") for path in relative_paths)
    return [
        path.with_suffix(".png") if stems[path.with_suffix("")] == 1 else path.with_name(path.name + ".png")
        for path in relative_paths
    ]


def read_image(path: Path) -> Image.Image | None:
    """The image as RGB, or None after a one-line message when PIL cannot decode it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        tqdm.write(f"skipping {path}: not a readable image ({reason})", file=sys.stderr)
        return None


@torch.no_grad()
def detect(
    inference: InferenceModel, paths: Sequence[Path], device: torch.device, batch_size: int
) -> Iterator[tuple[int, Image.Image, dict[str, Tensor]]]:
    """(index in ``paths``, RGB image, detections on the CPU) of every readable image, run ``batch_size`` at a time.

    Detections: ``labels`` int64 [k], ``boxes`` float32 [k, 4] xyxy in pixels of the original image (not clipped to
    it, see the module docstring), ``scores`` [k], k = min(300, Q·K), sorted by score.
    """
    model = inference.model.to(device)
    with tqdm(total=len(paths), desc="predict", unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            batch = [(index, read_image(paths[index])) for index in range(start, min(start + batch_size, len(paths)))]
            batch = [(index, image) for index, image in batch if image is not None]
            if batch:
                images = torch.stack([inference.preprocess(image) for _, image in batch]).to(device)
                sizes = torch.tensor([image.size for _, image in batch], device=device)  # PIL size is (w, h)
                results = inference.postprocessor(model(images), sizes)
                for (index, image), result in zip(batch, results, strict=True):
                    yield index, image, {key: value.cpu() for key, value in result.items()}
            bar.update(min(batch_size, len(paths) - start))


@functools.cache
def label_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(LABEL_FONT, size)


def shown_detections(detections: dict[str, Tensor], threshold: float, nms_iou: float | None = None) -> list[int]:
    """Indices of the detections to draw, best first: those scoring ≥ ``threshold``; with ``nms_iou``, of boxes of
    one class overlapping by an IoU above it only the best (boxes of different classes never suppress each other)."""
    keep = (detections["scores"] >= threshold).nonzero().flatten()
    if nms_iou is not None:
        boxes, scores, labels = (detections[key][keep] for key in ("boxes", "scores", "labels"))
        keep = keep[batched_nms(boxes.float(), scores.float(), labels, nms_iou)]
    return sorted(keep.tolist(), key=lambda index: -float(detections["scores"][index]))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    boxes: Sequence[Sequence[float]], tag_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> list[tuple[int, int, int, int] | None]:
    """Where each box's tag goes, (left, top, right, bottom) with right/bottom exclusive, or None for no tag.

    Boxes come best first and take the first free spot of: just above the box, inside its top edge, just below it,
    each moved sideways and up or down as far as needed to lie inside the image. A tag that would overlap an earlier
    tag, in every spot, or that is larger than the image, is left out (its box is still drawn): in a crowd the best
    boxes keep readable labels rather than all of them clipping each other.
    """
    width, height = image_size
    placed: list[tuple[int, int, int, int]] = []
    spots: list[tuple[int, int, int, int] | None] = []
    for (x0, y0, _, y1), (tag_width, tag_height) in zip(boxes, tag_sizes, strict=True):
        spot = None
        if tag_width <= width and tag_height <= height:
            left = min(max(0, round(x0)), width - tag_width)
            for wanted_top in (round(y0) - tag_height, round(y0), round(y1)):
                top = min(max(0, wanted_top), height - tag_height)
                candidate = (left, top, left + tag_width, top + tag_height)
                if not any(_overlaps(candidate, other) for other in placed):
                    spot = candidate
                    placed.append(spot)
                    break
        spots.append(spot)
    return spots


def draw_detections(
    image: Image.Image,
    detections: dict[str, Tensor],
    class_names: Sequence[str],
    threshold: float,
    nms_iou: float | None = None,
) -> Image.Image:
    """A copy of ``image`` with the ``shown_detections`` drawn: box outline (clipped to the image) and "name score" tag.

    The best detection is drawn last, so it is never hidden under a weaker duplicate. Tags come after every box (a
    later box's edge once ran through a tag's text: "baseba l glove"), lie inside the image, never overlap each other
    (``place_labels``), and their font grows with the image.
    """
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = label_font(max(11, round(max(image.size) / 45)))
    width = max(1, round(max(image.size) / 400))  # outlines stay visible on large photos
    shown = shown_detections(detections, threshold, nms_iou)
    limits = torch.tensor([image.width, image.height] * 2, dtype=detections["boxes"].dtype)
    boxes = torch.minimum(detections["boxes"][shown].clamp(min=0), limits).tolist()
    labels = [int(detections["labels"][index]) for index in shown]
    texts = [
        f"{class_names[label]} {float(detections['scores'][index]):.2f}"
        for label, index in zip(labels, shown, strict=True)
    ]
    text_boxes = [font.getbbox(text) for text in texts]
    tag_sizes = [
        (right - left + 2 * TAG_PADDING, bottom - top + 2 * TAG_PADDING) for left, top, right, bottom in text_boxes
    ]
    for box, label in reversed(list(zip(boxes, labels, strict=True))):  # ascending score: the best on top
        draw.rectangle(box, outline=PALETTE[label % len(PALETTE)], width=width)
    spots = place_labels(boxes, tag_sizes, image.size)
    for spot, label, text, (text_left, text_top, _, _) in zip(spots, labels, texts, text_boxes, strict=True):
        if spot is not None:
            left, top, right, bottom = spot
            draw.rectangle((left, top, right - 1, bottom - 1), fill=PALETTE[label % len(PALETTE)])
            position = (left + TAG_PADDING - text_left, top + TAG_PADDING - text_top)
            draw.text(position, text, fill=(255, 255, 255), font=font)
    return canvas


def dataset_ids(ann: Path, relative: Sequence[Path], inference: InferenceModel) -> tuple[list[int | None], list[int]]:
    """(image id of every input file or None when ``ann`` does not list it, category id of every label) from ``ann``."""
    coco = load_ground_truth(ann)
    by_name = {Path(image["file_name"]).as_posix(): image["id"] for image in coco.dataset["images"]}
    by_base = Counter(Path(name).name for name in by_name)
    base_ids = {Path(name).name: image_id for name, image_id in by_name.items() if by_base[Path(name).name] == 1}
    image_ids = [by_name.get(path.as_posix(), base_ids.get(path.name)) for path in relative]
    category_ids = sorted(coco.getCatIds())
    if inference.category_ids is not None:
        missing = sorted(set(inference.category_ids) - set(category_ids))
        if missing:
            raise InputError(
                f"--ann {ann}: lacks the checkpoint's category ids {missing[:5]}; is it the right dataset?"
            )
        return image_ids, inference.category_ids
    if len(category_ids) != len(inference.class_names):
        raise InputError(
            f"--ann {ann}: has {len(category_ids)} categories, the checkpoint {len(inference.class_names)} classes"
        )
    return image_ids, category_ids


def predict(
    inference: InferenceModel,
    images: Path,
    output_dir: Path,
    device: torch.device,
    batch_size: int = 8,
    threshold: float = 0.3,
    ann: Path | None = None,
    draw_nms: float | None = None,
) -> tuple[list[dict], dict]:
    """Detect on the image file or folder ``images``; write detections.json, images.json and the PNGs to ``output_dir``.

    Returns (the COCO results list, the images.json content). Unreadable images are reported and left out; when none
    can be read (or ``ann`` lists none of them) it is an ``InputError``. An ``output_dir`` (or a subfolder of the
    drawings) that cannot be a folder is an ``OutputError``.
    """
    make_output_dir(output_dir, "--output")
    paths = find_images(images, exclude=output_dir)
    root = images if images.is_dir() else images.parent
    relative = [path.relative_to(root) for path in paths]
    if ann is not None:
        image_ids, category_ids = dataset_ids(ann, relative, inference)
    else:
        image_ids = list(range(1, len(paths) + 1))
        category_ids = inference.category_ids or list(range(1, len(inference.class_names) + 1))
    unlisted = [path for path, image_id in zip(relative, image_ids, strict=True) if image_id is None]
    if unlisted:
        tqdm.write(
            f"skipping {len(unlisted)} images that --ann {ann} does not list (e.g. {unlisted[0]})", file=sys.stderr
        )
    listed = [index for index, image_id in enumerate(image_ids) if image_id is not None]
    if not listed:
        raise InputError(f"--ann {ann}: lists none of the {len(paths)} images in {images}; is it the right file?")
    drawings = visualization_names(relative)
    results, entries = [], []
    label_to_category = torch.tensor(category_ids)
    for position, image, detections in detect(inference, [paths[i] for i in listed], device, batch_size):
        index = listed[position]
        results.extend(coco_results(image_ids[index], detections, label_to_category))
        drawing = make_output_dir(output_dir / drawings[index].parent, "--output") / drawings[index].name
        canvas = draw_detections(image, detections, inference.class_names, threshold, draw_nms)
        atomic_write(drawing, functools.partial(canvas.save, format="PNG"))
        entry = {"id": image_ids[index], "file_name": relative[index].as_posix(), "width": image.width}
        entries.append(entry | {"height": image.height, "visualization": drawings[index].as_posix()})
    if not entries:
        raise InputError(f"{images}: none of the {len(listed)} images could be read")
    categories = [{"id": int(i), "name": name} for i, name in zip(category_ids, inference.class_names, strict=True)]
    index_file = {"images": entries, "categories": categories}
    atomic_write_text(output_dir / "detections.json", json.dumps(results))
    atomic_write_text(output_dir / "images.json", json.dumps(index_file, indent=1))
    return results, index_file


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of train_progressive.py or official DEIMv2")
    parser.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="folder for detections.json, images.json, PNGs")
    parser.add_argument("--ann", type=Path, help="COCO file whose image and category ids the output uses")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score drawn (the JSON keeps all)")
    parser.add_argument(
        "--draw-nms",
        type=float,
        metavar="IOU",
        help="draw only the best of the boxes of one class that overlap by more than this IoU (the JSON keeps all)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--class-names", help="comma-separated names replacing the checkpoint's (e.g. cat,dog)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.draw_nms is not None and not 0 <= args.draw_nms <= 1:
            raise InputError(f"--draw-nms is an IoU in [0, 1], got {args.draw_nms}")
        make_output_dir(args.output, "--output")  # before the checkpoint is read: a wrong path fails at once
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available; use --device cpu")
        class_names = [name.strip() for name in args.class_names.split(",")] if args.class_names else None
        inference = load_for_inference(args.checkpoint, class_names)
        results, index_file = predict(
            inference, args.images, args.output, device, args.batch_size, args.threshold, args.ann, args.draw_nms
        )
    except UserError as error:
        return report(error)
    drawn = f"score ≥ {args.threshold}" + (f", per-class NMS at IoU {args.draw_nms:g}" if args.draw_nms else "")
    tqdm.write(
        f"{len(index_file['images'])} images, {len(results)} detections → {args.output / 'detections.json'} "
        f"(drawn: {drawn})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
