"""Batched inference with a trained (or official) DEIMv2 checkpoint: COCO results JSON plus one annotated PNG per image.

    python -m multimodal.predict --checkpoint checkpoints/phase2_best.pth --images photos/ --output predictions/
    python -m multimodal.predict --checkpoint deimv2_atto_coco.pth --images a.jpg --output out --class-names cat,dog

Accepted checkpoints: those of ``train_progressive.py`` (EMA weights when present; with text fusion from phase 1 on,
a plain detector for phase 0) and official DEIMv2 files (variant guessed from the weights, classes named ``class_k``
unless ``--class-names`` is given). Images are preprocessed exactly as in validation.

Outputs in ``--output``:
- ``detections.json``: a standard COCO results list, the top-300 detections of every image **without** a score
  threshold (COCO evaluation needs the low-score tail). ``image_id`` = index of the image among the sorted input files
  (unreadable files keep their index, so ids do not shift); ``category_id`` = label + 1.
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
    CheckpointError,
    checkpoint_num_classes,
    detector_state_dict,
    guess_variant,
    load_detector_state,
    read_checkpoint,
)
from deim_lib.data.transforms import build_val_transforms
from deim_lib.evaluate import coco_results
from deim_lib.model import DEIM, build_detector
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD, get_variant
from multimodal.checkpointing import best_weights
from multimodal.model import MultimodalDetector, attach_text, load_weights
from multimodal.text_encoder import TextEmbeddings

# Distinct colours, cycled by label, so neighbouring classes differ in the drawings.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230))


class InputError(ValueError):
    """No usable input images or an unusable output folder; the message names the path."""


@dataclass
class InferenceModel:
    """A detector ready for inference and what its inputs and outputs mean.

    ``model`` (eval mode, CPU) maps images float32 [B, 3, S, S] to ``pred_logits`` [B, Q, K] / ``pred_boxes``
    [B, Q, 4] (normalised cxcywh); ``postprocessor`` turns them into per-image ``labels`` int64, ``boxes`` float32
    xyxy pixels and ``scores`` for the given (width, height). ``normalize`` = (mean, std) for the DINOv3 variants.
    """

    model: DEIM | MultimodalDetector
    postprocessor: PostProcessor
    class_names: list[str]
    image_size: int
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    variant: str

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL RGB image → float32 [3, S, S], as validation does: bilinear resize on PIL, [0, 1], optional mean/std."""
        tensor, _ = build_val_transforms(self.image_size, self.normalize)(image, {})
        return tensor.as_subclass(Tensor)


def _fusion_model(detector: DEIM, checkpoint: dict, fusion_state: dict, path: str | Path) -> MultimodalDetector:
    """Wrap ``detector`` with the text fusion the checkpoint was trained with, its embeddings as a constant."""
    try:
        text = TextEmbeddings.from_dict(checkpoint["text_embeddings"])
        num_heads = int(checkpoint["config"]["fusion"]["num_heads"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: has text-fusion weights but no {error} to rebuild the fusion with") from None
    if text.class_names != list(checkpoint["class_names"]):
        raise CheckpointError(f"{path}: the text embeddings describe {text.class_names}, not the checkpoint's classes")
    # The classifier's presence is read from the weights: they decide which modules must exist.
    text_aware = any(key.startswith("text_classifier.") for key in fusion_state)
    return attach_text(detector, text.embeddings, num_heads, text_aware)


def _load_training_checkpoint(checkpoint: dict, path: str | Path) -> tuple[DEIM | MultimodalDetector, list[str], int]:
    missing = [key for key in ("model", "variant", "class_names", "image_size") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint of train_progressive.py without {missing}; is the file complete?")
    detector_state, fusion_state = best_weights(checkpoint)
    class_names, image_size = list(checkpoint["class_names"]), int(checkpoint["image_size"])
    detector = build_detector(checkpoint["variant"], len(class_names), eval_size=(image_size, image_size))
    model = _fusion_model(detector, checkpoint, fusion_state, path) if fusion_state else detector
    load_weights(model, detector_state, fusion_state, str(path))
    return model, class_names, image_size


def _load_official_checkpoint(checkpoint: dict, path: str | Path) -> tuple[DEIM, list[str], int]:
    state_dict = detector_state_dict(checkpoint, path)
    variant = guess_variant(state_dict)
    if variant is None:
        raise CheckpointError(f"{path}: the weights match no DEIMv2 variant; is this a DEIMv2 detector checkpoint?")
    num_classes = checkpoint_num_classes(state_dict)
    detector = build_detector(variant, num_classes)
    load_detector_state(detector, state_dict, path)
    return detector, [f"class_{k}" for k in range(num_classes)], get_variant(variant).eval_size[0]


def load_for_inference(path: str | Path, class_names: Sequence[str] | None = None) -> InferenceModel:
    """Read a checkpoint of ``train_progressive.py`` (has ``phase``) or an official DEIMv2 one into an eval model.

    ``class_names`` replaces the checkpoint's names (official checkpoints have none); their count must match. Every
    problem with the file is a ``CheckpointError`` naming it.
    """
    checkpoint = read_checkpoint(path)
    if "phase" in checkpoint:
        model, names, image_size = _load_training_checkpoint(checkpoint, path)
    else:
        model, names, image_size = _load_official_checkpoint(checkpoint, path)
    if class_names is not None:
        if len(class_names) != len(names):
            raise CheckpointError(f"{path}: has {len(names)} classes, but {len(class_names)} class names were given")
        names = list(class_names)
    detector = model.detector if isinstance(model, MultimodalDetector) else model
    variant = get_variant(detector.variant)
    normalize = (IMAGENET_MEAN, IMAGENET_STD) if variant.imagenet_normalize else None
    return InferenceModel(model.eval(), PostProcessor(len(names)), names, image_size, normalize, variant.name)


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

    Detections: ``labels`` int64 [k], ``boxes`` float32 [k, 4] xyxy in pixels of the original image, ``scores`` [k],
    k = min(300, Q·K), sorted by score.
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


def draw_detections(
    image: Image.Image, detections: dict[str, Tensor], class_names: Sequence[str], threshold: float
) -> Image.Image:
    """A copy of ``image`` with every detection scoring ≥ ``threshold`` drawn: box outline and "name score" tag."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(image.size) / 400))  # outlines stay visible on large photos
    keep = detections["scores"] >= threshold
    for label, box, score in zip(
        detections["labels"][keep].tolist(),
        detections["boxes"][keep].tolist(),
        detections["scores"][keep].tolist(),
        strict=True,
    ):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        tag_top = max(0, box[1] - (bottom - top) - 2)  # above the box, or inside it at the image's top edge
        draw.rectangle((left, tag_top, right + 2, tag_top + bottom - top + 2), fill=colour)
        draw.text((box[0] + 1, tag_top + 1 - (top - box[1])), text, fill=(255, 255, 255), font=font)
    return canvas


def predict(
    inference: InferenceModel,
    images: Path,
    output_dir: Path,
    device: torch.device,
    batch_size: int = 8,
    threshold: float = 0.3,
) -> tuple[list[dict], dict]:
    """Detect on the image file or folder ``images``; write detections.json, images.json and the PNGs to ``output_dir``.

    Returns (the COCO results list, the images.json content). Unreadable images are reported and left out.
    """
    paths = find_images(images, exclude=output_dir)
    root = images if images.is_dir() else images.parent
    relative = [path.relative_to(root) for path in paths]
    drawings = visualization_names(relative)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, entries = [], []
    label_to_category = torch.arange(1, len(inference.class_names) + 1)  # category_id = label + 1
    for index, image, detections in detect(inference, paths, device, batch_size):
        results.extend(coco_results(index, detections, label_to_category))
        drawing = output_dir / drawings[index]
        drawing.parent.mkdir(parents=True, exist_ok=True)
        draw_detections(image, detections, inference.class_names, threshold).save(drawing)
        width, height = image.size
        entries.append(
            {
                "id": index,
                "file_name": relative[index].as_posix(),
                "width": width,
                "height": height,
                "visualization": drawings[index].as_posix(),
            }
        )
    categories = [{"id": label + 1, "name": name} for label, name in enumerate(inference.class_names)]
    index_file = {"images": entries, "categories": categories}
    (output_dir / "detections.json").write_text(json.dumps(results))
    (output_dir / "images.json").write_text(json.dumps(index_file, indent=1))
    return results, index_file


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of train_progressive.py or official DEIMv2")
    parser.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="folder for detections.json, images.json, PNGs")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score drawn (the JSON keeps all)")
    parser.add_argument("--batch-size", type=int, default=8)
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
        results, index_file = predict(inference, args.images, args.output, device, args.batch_size, args.threshold)
    except (CheckpointError, InputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tqdm.write(
        f"{len(index_file['images'])} images, {len(results)} detections → {args.output / 'detections.json'} "
        f"(drawn: score ≥ {args.threshold})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
