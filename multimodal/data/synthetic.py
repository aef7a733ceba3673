"""A small synthetic COCO-format surface-defect dataset for demos and smoke tests.

Each image is a procedural brushed-steel texture with 1–3 defects of five classes that differ in shape and colour:
scratch (long thin bright line), crack (near-black jagged polyline), pit (cluster of dark brown round spots), stain
(large soft orange blotch) and inclusion (dark navy elongated blob). Defects are large (both box sides ≥ 15 % of the
image side), high-contrast and never overlap, so a tiny detector learns them in minutes. Everything follows from the
seed: each image draws from its own ``numpy`` generator seeded by (seed, split, index).

Boxes are COCO [x, y, w, h] in pixels, tight around every pixel the defect touched (alpha > 0), and ``area`` = w·h.

Command line::

    python -m multimodal.data.synthetic --output DIR [--seed S --train N --val N --size PX]

writes ``DIR/images/{train,val}/NNNNN.jpg`` and ``DIR/annotations/{train,val}.json``.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_DESCRIPTIONS: dict[str, str] = {
    "scratch": "a long thin bright scratch on brushed steel",
    "crack": "a dark jagged crack on brushed steel",
    "pit": "a cluster of small dark round pits on brushed steel",
    "stain": "a large soft orange rust stain on brushed steel",
    "inclusion": "a dark blue elongated inclusion embedded in brushed steel",
}
CLASS_NAMES = tuple(CLASS_DESCRIPTIONS)

# RGB in 0..255, far apart from each other and from the steel grey (~110–170).
_COLORS = {
    "scratch": (245.0, 245.0, 235.0),
    "crack": (15.0, 12.0, 10.0),
    "pit": (75.0, 42.0, 20.0),
    "stain": (215.0, 110.0, 35.0),
    "inclusion": (30.0, 45.0, 115.0),
}
MIN_SIDE_FRACTION = 0.15
_MIN_ALPHA = 0.15  # soft edges fainter than this are cut, so the box never grows around invisible pixels
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Defect:
    """One rendered defect: ``alpha`` H×W float32 in [0, 1] (0 where untouched, ≥ 0.15 elsewhere) and ``color`` RGB."""

    name: str
    alpha: np.ndarray
    color: tuple[float, float, float]

    @property
    def bbox(self) -> list[float]:
        """COCO [x, y, w, h] in pixels around all pixels with alpha > 0."""
        cols = np.flatnonzero(self.alpha.any(axis=0))
        rows = np.flatnonzero(self.alpha.any(axis=1))
        return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def brushed_steel(rng: np.random.Generator, size: int) -> np.ndarray:
    """size×size×3 float32 texture in 0..255: grey with a linear light gradient and streaks along one direction."""
    streaks = rng.standard_normal((size, size + 31), dtype=np.float32).cumsum(axis=1)
    streaks = (streaks[:, 31:] - streaks[:, :-31]) / np.sqrt(31.0)  # moving sum along x: long brushing streaks
    if rng.random() < 0.5:
        streaks = streaks.T
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    grey = (
        rng.uniform(125.0, 155.0)
        + 18.0 * gradient
        + 6.0 * streaks
        + 3.0 * rng.standard_normal((size, size), dtype=np.float32)
    )
    tint = np.array([0.97, 1.0, 1.04], dtype=np.float32)  # slightly cold steel
    return (grey[..., None] * tint).astype(np.float32)


def _polyline_inside(points: np.ndarray, size: int, margin: float) -> bool:
    return bool((points >= margin).all() and (points <= size - 1 - margin).all())


def _draw_scratch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> bool:
    length = rng.uniform(0.5, 0.85) * size
    angle = np.deg2rad(rng.uniform(20.0, 70.0) + 90.0 * rng.integers(0, 4))  # diagonal: box is never a sliver
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.2, 0.8, size=2) * size
    t = np.linspace(-0.5, 0.5, 33)[:, None]
    bend = rng.uniform(-0.08, 0.08) * length * (1.0 - 4.0 * t**2)  # a gentle arc
    points = centre + t * length * direction + bend * normal
    if not _polyline_inside(points, size, 3.0):
        return False
    draw.line([tuple(p) for p in points], fill=255, width=max(2, round(size / 85)), joint="curve")
    return True


def _draw_crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> bool:
    heading = rng.uniform(0.0, 2.0 * np.pi)
    steps = rng.uniform(0.05, 0.09, size=int(rng.integers(8, 13))) * size
    turns = heading + rng.normal(0.0, 0.7, size=steps.size)  # sharp random turns: the jagged look
    moves = np.stack([np.cos(turns), np.sin(turns)], axis=1) * steps[:, None]
    start = rng.uniform(0.25, 0.75, size=2) * size
    trunk = np.vstack([start, start + moves.cumsum(axis=0)])
    fork = trunk[int(rng.integers(2, trunk.shape[0] - 1))]
    branch_turns = heading + rng.choice([-1.0, 1.0]) * 0.9 + rng.normal(0.0, 0.6, size=4)
    branch_moves = np.stack([np.cos(branch_turns), np.sin(branch_turns)], axis=1) * 0.05 * size
    branch = np.vstack([fork, fork + branch_moves.cumsum(axis=0)])
    if not (_polyline_inside(trunk, size, 3.0) and _polyline_inside(branch, size, 3.0)):
        return False
    width = max(2, round(size / 100))
    draw.line([tuple(p) for p in trunk], fill=255, width=width + 1)
    draw.line([tuple(p) for p in branch], fill=255, width=width)
    return True


def _draw_pit(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> bool:
    cluster_radius = rng.uniform(0.1, 0.16) * size
    count = int(rng.integers(6, 13))
    radii = rng.uniform(0.018, 0.035, size=count) * size
    angles = rng.uniform(0.0, 2.0 * np.pi, size=count)
    distances = cluster_radius * np.sqrt(rng.uniform(0.0, 1.0, size=count))
    centre = rng.uniform(0.2, 0.8, size=2) * size
    spots = centre + distances[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if not ((spots - radii[:, None] >= 2).all() and (spots + radii[:, None] <= size - 3).all()):
        return False
    for (x, y), r in zip(spots, radii, strict=True):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return True


def _blob_outline(
    rng: np.random.Generator, centre: np.ndarray, radii: tuple[float, float], wobble: float
) -> np.ndarray:
    """64 outline points of a rotated ellipse whose radius wobbles with three random low harmonics."""
    theta = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    scale = np.ones_like(theta)
    for harmonic in (2, 3, 5):
        scale += wobble * rng.uniform(-1.0, 1.0) * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * np.pi))
    x, y = radii[0] * scale * np.cos(theta), radii[1] * scale * np.sin(theta)
    rotation = rng.uniform(0.0, np.pi)
    c, s = np.cos(rotation), np.sin(rotation)
    return centre + np.stack([c * x - s * y, s * x + c * y], axis=1)


def _draw_stain(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> bool:
    radius = rng.uniform(0.13, 0.2) * size
    outline = _blob_outline(rng, rng.uniform(0.2, 0.8, size=2) * size, (radius, radius * rng.uniform(0.7, 1.0)), 0.12)
    if not _polyline_inside(outline, size, 0.05 * size):  # room for the blurred rim
        return False
    draw.polygon([tuple(p) for p in outline], fill=255)
    return True


def _draw_inclusion(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> bool:
    length = rng.uniform(0.13, 0.2) * size
    outline = _blob_outline(rng, rng.uniform(0.2, 0.8, size=2) * size, (length, length * rng.uniform(0.25, 0.4)), 0.06)
    if not _polyline_inside(outline, size, 2.0):
        return False
    draw.polygon([tuple(p) for p in outline], fill=255)
    return True


# name → (draws the mask at 255, opacity, Gaussian blur radius as a fraction of the image side)
_DRAWERS: dict[str, tuple[Callable[[ImageDraw.ImageDraw, np.random.Generator, int], bool], float, float]] = {
    "scratch": (_draw_scratch, 0.95, 0.0),
    "crack": (_draw_crack, 0.95, 0.0),
    "pit": (_draw_pit, 0.9, 0.004),
    "stain": (_draw_stain, 0.8, 0.025),
    "inclusion": (_draw_inclusion, 0.9, 0.004),
}


def _soften(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of the drawn region plus a 3σ border only: the rest of the canvas is 0 and stays 0."""
    left, top, right, bottom = mask.getbbox()
    pad = int(np.ceil(3.0 * radius)) + 1
    region = (max(left - pad, 0), max(top - pad, 0), min(right + pad, mask.width), min(bottom + pad, mask.height))
    mask.paste(mask.crop(region).filter(ImageFilter.GaussianBlur(radius)), region[:2])
    return mask


def sample_defect(name: str, rng: np.random.Generator, size: int, max_tries: int = 100) -> Defect:
    """A random defect of class ``name`` on a size×size canvas whose box sides are both ≥ 15 % of ``size``."""
    if name not in _DRAWERS:
        raise ValueError(f"unknown defect class {name!r}; expected one of {', '.join(CLASS_NAMES)}")
    draw_mask, opacity, blur = _DRAWERS[name]
    jitter = rng.uniform(-12.0, 12.0, size=3)
    color = tuple(float(c) for c in np.clip(np.array(_COLORS[name]) + jitter, 0.0, 255.0))
    for _ in range(max_tries):
        mask = Image.new("L", (size, size), 0)
        if not draw_mask(ImageDraw.Draw(mask), rng, size):
            continue
        if blur > 0:
            mask = _soften(mask, blur * size)
        alpha = np.asarray(mask, dtype=np.float32) * (opacity / 255.0)
        alpha[alpha < _MIN_ALPHA] = 0.0
        defect = Defect(name, alpha, color)
        if min(defect.bbox[2:]) >= MIN_SIDE_FRACTION * size:
            return defect
    raise RuntimeError(f"could not draw a {name} of the minimum size in {max_tries} tries")


def paste(image: np.ndarray, defect: Defect) -> None:
    """Alpha-blends ``defect`` into ``image`` (H×W×3 float32, 0..255) in place."""
    x, y, w, h = (int(v) for v in defect.bbox)
    alpha = defect.alpha[y : y + h, x : x + w, None]  # alpha is 0 outside the box
    region = image[y : y + h, x : x + w]
    region *= 1.0 - alpha
    region += alpha * np.asarray(defect.color, dtype=np.float32)


def _overlaps(box: list[float], others: list[list[float]], gap: float = 2.0) -> bool:
    x, y, w, h = box
    return any(
        x < ox + ow + gap and ox < x + w + gap and y < oy + oh + gap and oy < y + h + gap for ox, oy, ow, oh in others
    )


def render_image(
    rng: np.random.Generator, size: int, first_class: str
) -> tuple[np.ndarray, list[tuple[str, list[float]]]]:
    """One size×size×3 uint8 image and its (class name, COCO box) list: ``first_class`` plus 0–2 random defects.

    Extra defects that would touch an earlier box are redrawn a few times and dropped if they still do, so every box
    stays tight around visible pixels of its own defect.
    """
    image = brushed_steel(rng, size)
    names = [first_class, *rng.choice(CLASS_NAMES, size=int(rng.integers(0, 3))).tolist()]
    placed: list[tuple[str, list[float]]] = []
    for name in names:
        for _ in range(20):
            defect = sample_defect(name, rng, size)
            if not _overlaps(defect.bbox, [box for _, box in placed]):
                paste(image, defect)
                placed.append((name, defect.bbox))
                break
    image += 2.0 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise over defects as well
    return np.clip(image, 0.0, 255.0).round().astype(np.uint8), placed


def _write_split(root: Path, split: str, split_code: int, seed: int, count: int, size: int) -> tuple[Path, Path]:
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        # cycling the first defect's class puts every class in every split of ≥ 5 images
        pixels, placed = render_image(rng, size, CLASS_NAMES[index % len(CLASS_NAMES)])
        file_name = f"{index:05d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=_JPEG_QUALITY)
        images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
        for name, box in placed:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": CLASS_NAMES.index(name) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "defect", "description": CLASS_DESCRIPTIONS[name]}
        for i, name in enumerate(CLASS_NAMES)
    ]
    info = {"description": f"synthetic surface defects, {split} split", "seed": seed}
    ann_path = root / "annotations" / f"{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(
        json.dumps({"info": info, "images": images, "annotations": annotations, "categories": categories})
    )
    return image_dir, ann_path


def generate(
    output_dir: str | Path, seed: int = 0, num_train: int = 300, num_val: int = 80, image_size: int = 256
) -> dict[str, Path]:
    """Writes the dataset under ``output_dir``; returns the paths ``train_images``, ``train_annotations``,
    ``val_images`` and ``val_annotations``. The same arguments always give byte-identical files."""
    root = Path(output_dir)
    paths: dict[str, Path] = {}
    for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        paths[f"{split}_images"], paths[f"{split}_annotations"] = _write_split(
            root, split, split_code, seed, count, image_size
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthetic surface-defect dataset (COCO format).")
    parser.add_argument("--output", type=Path, required=True, help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=300, help="number of training images")
    parser.add_argument("--val", type=int, default=80, help="number of validation images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.size < 64 or args.train < 0 or args.val < 0:
        parser.error("--size must be ≥ 64 and --train/--val ≥ 0")
    start = time.perf_counter()
    paths = generate(args.output, args.seed, args.train, args.val, args.size)
    print(f"wrote {args.train} train + {args.val} val images in {time.perf_counter() - start:.1f} s")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
