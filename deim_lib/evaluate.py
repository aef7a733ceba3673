"""COCO box evaluation of a detector, and a command line that scores a saved detections file.

Detections use the standard COCO results format: one dict per box with ``image_id`` (int), ``category_id`` (int, a
category id of the ground truth), ``bbox`` [x, y, w, h] in pixels of the original image and ``score`` (float).
Metrics come from faster-coco-eval (the evaluator official DEIMv2 uses); its first 12 summary numbers equal
pycocotools' ``COCOeval.stats``, including -1 for a summary without ground truth (e.g. APs when no object is small).

Command line::

    python -m deim_lib.evaluate --ann GT.json --detections DETS.json [--json]
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deim_lib.cli import HelpFormatter, report
from deim_lib.errors import UserError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


class EvaluationInputError(UserError):
    """A ground-truth or detections file that cannot be read; the message names the file."""


def coco_metrics(coco_gt: COCO, detections: list[dict]) -> dict:
    """COCO bbox metrics of ``detections`` against ``coco_gt``.

    Returns the 12 keys of ``METRIC_NAMES`` as floats (AP averaged over IoU 0.50:0.95, AR at 1/10/100 detections per
    image, area ranges small/medium/large) plus ``per_class``: {category name: {"AP": float, "AP50": float}} taken
    from the accumulated precision array (all areas, 100 detections), -1.0 for a category without ground truth.
    Empty ``detections`` give 0.0 everywhere. ``detections`` is not modified.
    """
    categories = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    if not detections:
        zeros = dict.fromkeys(METRIC_NAMES, 0.0)
        return {**zeros, "per_class": {cat["name"]: {"AP": 0.0, "AP50": 0.0} for cat in categories}}

    # loadRes writes id/area/iscrowd/segmentation into every dict it is given, so it gets copies.
    coco_dt = coco_gt.loadRes([dict(det) for det in detections])
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics: dict = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:12], strict=True)}

    # precision: T (IoU thresholds) × R (recall points) × K (categories, sorted ids) × A (areas) × M (max dets).
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    metrics["per_class"] = {
        cat["name"]: {"AP": _valid_mean(precision[:, :, k]), "AP50": _valid_mean(precision[iou50, :, k])}
        for k, cat in enumerate(categories)
    }
    return metrics


def _valid_mean(values: np.ndarray) -> float:
    """Mean over entries > -1 (COCO marks undefined precision with -1); -1.0 when none is defined."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def gather_detections(detections: list[dict]) -> list[dict]:
    """All ranks' detections on every rank; the input itself when torch.distributed is not initialised.

    A DistributedSampler pads the last batch with images of other ranks, so an image can be scored twice; only the
    lowest rank that reported an image keeps its detections (duplicates would count as false positives).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return detections
    per_rank: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, detections)
    merged: list[dict] = []
    seen_images: set[int] = set()
    for rank_detections in per_rank:
        assert rank_detections is not None  # all_gather_object fills every slot
        merged.extend(det for det in rank_detections if det["image_id"] not in seen_images)
        seen_images.update(det["image_id"] for det in rank_detections)
    return merged


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    postprocessor: Callable,
    loader: DataLoader,
    device: torch.device,
    category_ids: Sequence[int],
    coco_gt: COCO,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Runs ``model`` over ``loader`` and scores its detections with ``coco_metrics``.

    Batches are (images B×3×H×W float, targets) with each target holding ``image_id`` int64 [1] and ``orig_size``
    int64 [2] = (W, H). ``model(images)`` returns {"pred_logits", "pred_boxes"}; ``postprocessor(outputs, orig_sizes
    B×2 (W, H))`` returns per image {labels (contiguous 0..K-1), boxes xyxy in original-image pixels, scores}.
    Label i becomes ``category_ids[i]`` and boxes become COCO xywh. The model runs in eval mode and gets its previous
    mode back. Returns (metrics, detections gathered over all ranks).
    """
    was_training = model.training
    model.eval()
    label_to_category = torch.as_tensor(category_ids, dtype=torch.int64)
    detections: list[dict] = []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        outputs = model(images.to(device))
        orig_sizes = torch.stack([target["orig_size"] for target in targets]).to(device)
        results = postprocessor(outputs, orig_sizes)
        for target, result in zip(targets, results, strict=True):
            detections.extend(coco_results(int(target["image_id"].item()), result, label_to_category))
    model.train(was_training)
    detections = gather_detections(detections)
    return coco_metrics(coco_gt, detections), detections


def coco_results(image_id: int, result: dict, label_to_category: torch.Tensor) -> list[dict]:
    """One image's post-processed {labels, boxes xyxy pixels, scores} → COCO results (``bbox`` xywh, ``category_id``
    = ``label_to_category[label]``)."""
    boxes = result["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    categories = label_to_category[result["labels"].cpu()].tolist()
    scores = result["scores"].float().cpu().tolist()
    return [
        {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}
        for cat, box, score in zip(categories, xywh, scores, strict=True)
    ]


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluationInputError(f"cannot read {what} file {path}: {error}") from error


def load_ground_truth(path: Path) -> COCO:
    """A COCO ground-truth object from an instances JSON file; raises EvaluationInputError naming the file."""
    data = _read_json(path, "ground-truth")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "categories")):
        raise EvaluationInputError(f"ground-truth file {path} is not COCO instances JSON (needs images, categories)")
    data.setdefault("annotations", [])
    try:
        return COCO(data)
    except (KeyError, TypeError, ValueError) as error:
        raise EvaluationInputError(f"ground-truth file {path} has a malformed entry: {error!r}") from error


def load_detections(path: Path, coco_gt: COCO) -> list[dict]:
    """COCO results list from ``path``, checked against ``coco_gt``; raises EvaluationInputError naming the file."""
    data = _read_json(path, "detections")
    if not isinstance(data, list) or not all(isinstance(d, dict) and all(k in d for k in DETECTION_KEYS) for d in data):
        needed = ", ".join(DETECTION_KEYS)
        raise EvaluationInputError(f"detections file {path} is not a COCO results list (each needs {needed})")
    unknown = sorted({d["image_id"] for d in data} - set(coco_gt.getImgIds()))
    if unknown:
        raise EvaluationInputError(f"detections file {path} has image ids not in the ground truth: {unknown[:5]}")
    return data


def format_table(metrics: dict, per_class: bool = True) -> str:
    """The 12 summary metrics, then (``per_class``) per-class AP and AP50, as aligned text: fractions to 4 decimals,
    as the training log prints them, "-" where undefined."""
    lines = [f"{name:>6}  {_fraction(metrics[name])}" for name in METRIC_NAMES]
    if not per_class:
        return "\n".join(lines)
    width = max((len(name) for name in metrics["per_class"]), default=5)
    lines += ["", f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
    lines += [
        f"{name:<{width}}  {_fraction(values['AP'])}  {_fraction(values['AP50'])}"
        for name, values in metrics["per_class"].items()
    ]
    return "\n".join(lines)


def _fraction(value: float) -> str:
    return f"{value:6.4f}" if value >= 0 else f"{'-':>6}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="COCO bbox metrics of a detections file.", formatter_class=HelpFormatter
    )
    parser.add_argument("--ann", type=Path, required=True, help="ground-truth COCO instances JSON")
    parser.add_argument("--detections", type=Path, required=True, help="COCO results JSON (list of detections)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        coco_gt = load_ground_truth(args.ann)
        detections = load_detections(args.detections, coco_gt)
    except EvaluationInputError as error:
        return report(error)
    metrics = coco_metrics(coco_gt, detections)
    print(json.dumps(metrics) if args.json else format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
