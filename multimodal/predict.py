"""Batched inference with a trained (or official) DEIMv2 checkpoint: COCO results JSON plus one annotated PNG per image.

    python -m multimodal.predict --checkpoint checkpoints/phase2_best.pth --images photos/ --output predictions/
    python -m multimodal.predict --checkpoint phase2_best.pth --images val_images/ --ann val.json --output out
    python -m multimodal.predict --checkpoint deimv2_atto_coco.pth --images a.jpg --output out --class-names cat,dog

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
  threshold (COCO evaluation needs the low-score tail), boxes clipped to the image.
- ``images.json``: {"images": [{"id", "file_name" (relative to --images), "width", "height", "visualization"}],
  "categories": [{"id", "name"}]}; with an empty ``annotations`` list it is a COCO ground-truth skeleton.
- one PNG per image at its original size, with the boxes scoring at least ``--threshold`` drawn (``visualization``).
"""

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from deim_lib.checkpoint import (
    checkpoint_image_size,
    checkpoint_num_classes,
    detector_state_dict,
    guess_variant,
    load_detector_state,
    read_checkpoint,
)
from deim_lib.cli import HelpFormatter, report
from deim_lib.data.transforms import build_val_transforms
from deim_lib.errors import CheckpointError, UserError
from deim_lib.evaluate import coco_results, load_ground_truth
from deim_lib.model import DEIM, build_detector
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD, get_variant
from multimodal.model import MultimodalDetector, attach_text, load_weights
from multimodal.phase_checkpoint import PhaseCheckpoint, is_phase_checkpoint
from multimodal.text_encoder import TextEmbeddings

# Distinct colours, cycled by label, so neighbouring classes differ in the drawings.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230))


class InputError(UserError):
    """No usable input images, or an unusable output folder or --ann file; the message names the path."""


@dataclass
class InferenceModel:
    """A detector ready for inference and what its inputs and outputs mean.

    ``model`` (eval mode, CPU) maps images float32 [B, 3, S, S] to ``pred_logits`` [B, Q, K] / ``pred_boxes``
    [B, Q, 4] (normalised cxcywh); ``postprocessor`` turns them into per-image ``labels`` int64, ``boxes`` float32
    xyxy pixels and ``scores`` for the given (width, height). ``normalize`` = (mean, std) for the DINOv3 variants.
    ``category_ids``: the dataset's category id of each label, None when the checkpoint does not know them.
    """

    model: DEIM | MultimodalDetector
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


def phase_model(checkpoint: PhaseCheckpoint, path: str | Path) -> DEIM | MultimodalDetector:
    """The detector (and the text fusion it was trained with, its embeddings a constant) with the EMA weights."""
    detector_state, fusion_state = checkpoint.weights()
    info = checkpoint.info
    detector = build_detector(info.variant, len(info.class_names), eval_size=(info.image_size, info.image_size))
    model = detector
    if fusion_state:
        if checkpoint.text_embeddings is None:
            raise CheckpointError(f"{path}: has text-fusion weights but no text embeddings to rebuild the fusion with")
        text = TextEmbeddings.from_dict(checkpoint.text_embeddings)
        if text.class_names != list(info.class_names):
            raise CheckpointError(f"{path}: its text embeddings describe other classes than its detector's")
        try:
            num_heads = int(info.config["fusion"]["num_heads"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: its config has no fusion.num_heads (not written by train_progressive.py?)"
            ) from None
        # The classifier's presence is read from the weights: they decide which modules must exist.
        text_aware = any(key.startswith("text_classifier.") for key in fusion_state)
        model = attach_text(detector, text.embeddings, num_heads, text_aware)
    load_weights(model, detector_state, fusion_state, str(path))
    return model


def load_for_inference(path: str | Path, class_names: Sequence[str] | None = None) -> InferenceModel:
    """Read a checkpoint of ``train_progressive.py`` or an official DEIMv2 one into an eval-mode model.

    ``class_names`` replaces the checkpoint's names (official checkpoints have none); their count must match. Every
    problem with the file is a ``CheckpointError`` naming it.
    """
    data = read_checkpoint(path)
    if is_phase_checkpoint(data):
        checkpoint = PhaseCheckpoint.from_dict(data, path)
        model, info = phase_model(checkpoint, path), checkpoint.info
        names, image_size, category_ids = list(info.class_names), info.image_size, list(info.category_ids)
    else:
        state_dict, _ = detector_state_dict(data, path)
        variant = guess_variant(state_dict)
        if variant is None:
            raise CheckpointError(f"{path}: the weights match no DEIMv2 variant; is this a DEIMv2 detector checkpoint?")
        image_size = checkpoint_image_size(state_dict, variant)
        model = build_detector(variant, checkpoint_num_classes(state_dict), eval_size=(image_size, image_size))
        load_detector_state(model, state_dict, path)
        names, category_ids = [f"class_{k}" for k in range(model.num_classes)], None
    if class_names is not None:
        if len(class_names) != len(names):
            raise CheckpointError(f"{path}: has {len(names)} classes, but {len(class_names)} class names were given")
        names = list(class_names)
    detector = model.detector if isinstance(model, MultimodalDetector) else model
    variant = get_variant(detector.variant)
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

    Detections: ``labels`` int64 [k], ``boxes`` float32 [k, 4] xyxy in pixels of the original image, clipped to it,
    ``scores`` [k], k = min(300, Q·K), sorted by score.
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
                    detections = {key: value.cpu() for key, value in result.items()}
                    limits = torch.tensor([image.width, image.height] * 2, dtype=detections["boxes"].dtype)
                    detections["boxes"] = torch.minimum(detections["boxes"].clamp(min=0), limits)
                    yield index, image, detections
            bar.update(min(batch_size, len(paths) - start))


def draw_detections(
    image: Image.Image, detections: dict[str, Tensor], class_names: Sequence[str], threshold: float
) -> Image.Image:
    """A copy of ``image`` with every detection scoring ≥ ``threshold`` drawn: box outline and "name score" tag.

    The best detection is drawn last, so it is never hidden under a weaker duplicate; tags stay inside the image and
    their font grows with it.
    """
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, round(max(image.size) / 45)))
    width = max(1, round(max(image.size) / 400))  # outlines stay visible on large photos
    keep = (detections["scores"] >= threshold).nonzero().flatten().tolist()
    for index in sorted(keep, key=lambda i: float(detections["scores"][i])):  # ascending: the best on top
        label, score = int(detections["labels"][index]), float(detections["scores"][index])
        box = detections["boxes"][index].tolist()
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 4, bottom - top + 4
        x = min(max(0.0, box[0]), max(0.0, image.width - tag_w))  # inside the image, left and right
        y = box[1] - tag_h if box[1] - tag_h >= 0 else min(max(0.0, box[1]), max(0.0, image.height - tag_h))
        draw.rectangle((x, y, x + tag_w, y + tag_h), fill=colour)
        draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)
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
) -> tuple[list[dict], dict]:
    """Detect on the image file or folder ``images``; write detections.json, images.json and the PNGs to ``output_dir``.

    Returns (the COCO results list, the images.json content). Unreadable images are reported and left out; when none
    can be read (or ``ann`` lists none of them) it is an ``InputError``.
    """
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
    output_dir.mkdir(parents=True, exist_ok=True)
    results, entries = [], []
    label_to_category = torch.tensor(category_ids)
    for position, image, detections in detect(inference, [paths[i] for i in listed], device, batch_size):
        index = listed[position]
        results.extend(coco_results(image_ids[index], detections, label_to_category))
        drawing = output_dir / drawings[index]
        drawing.parent.mkdir(parents=True, exist_ok=True)
        draw_detections(image, detections, inference.class_names, threshold).save(drawing)
        entry = {"id": image_ids[index], "file_name": relative[index].as_posix(), "width": image.width}
        entries.append(entry | {"height": image.height, "visualization": drawings[index].as_posix()})
    if not entries:
        raise InputError(f"{images}: none of the {len(listed)} images could be read")
    categories = [{"id": int(i), "name": name} for i, name in zip(category_ids, inference.class_names, strict=True)]
    index_file = {"images": entries, "categories": categories}
    (output_dir / "detections.json").write_text(json.dumps(results))
    (output_dir / "images.json").write_text(json.dumps(index_file, indent=1))
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
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--class-names", help="comma-separated names replacing the checkpoint's (e.g. cat,dog)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available; use --device cpu")
        class_names = [name.strip() for name in args.class_names.split(",")] if args.class_names else None
        inference = load_for_inference(args.checkpoint, class_names)
        results, index_file = predict(
            inference, args.images, args.output, device, args.batch_size, args.threshold, args.ann
        )
    except UserError as error:
        return report(error)
    tqdm.write(
        f"{len(index_file['images'])} images, {len(results)} detections → {args.output / 'detections.json'} "
        f"(drawn: score ≥ {args.threshold})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
