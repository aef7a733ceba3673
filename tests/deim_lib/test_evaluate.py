"""COCO evaluation: equality with pycocotools, the detector loop, rank gathering and the command line."""

import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO
from pycocotools import coco as pycocotools_coco
from pycocotools.cocoeval import COCOeval as PyCOCOeval
from torch import nn

from deim_lib import evaluate
from deim_lib.evaluate import METRIC_NAMES, coco_metrics, evaluate_detector, format_table, gather_detections, main
from deim_lib.postprocessor import PostProcessor
from tests.conftest import PROJECT_DIR


@pytest.fixture(scope="module")
def coco_tiny_ann(datasets_dir):
    return datasets_dir / "coco-tiny" / "annotations" / "instances_val2017.json"


def _noisy_detections(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered copies of ~85 % of the ground truth, some with the wrong class, plus random false positives."""
    rng = np.random.default_rng(seed)
    cat_ids = [cat["id"] for cat in gt["categories"]]
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    detections = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0.0, 0.08, size=4) * [w, h, w, h]
        cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
        detections.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box, "score": float(rng.random())})
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(10, width / 2), rng.uniform(10, height / 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            cat = int(rng.choice(cat_ids))
            detections.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": float(rng.random())})
    return detections


def _pycocotools_eval(ann_path, detections: list[dict]) -> PyCOCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = pycocotools_coco.COCO(str(ann_path))
        evaluator = PyCOCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_coco_metrics_equal_pycocotools_on_noisy_detections(coco_tiny_ann):
    gt = json.loads(coco_tiny_ann.read_text())
    detections = _noisy_detections(gt)
    reference = _pycocotools_eval(coco_tiny_ann, detections)

    metrics = coco_metrics(COCO(str(coco_tiny_ann)), detections)

    ours = np.array([metrics[name] for name in METRIC_NAMES])
    np.testing.assert_allclose(ours, reference.stats[:12], rtol=0, atol=1e-9)
    assert 0.2 < metrics["AP"] < 0.9  # the fixture really mixes hits and misses

    cat_names = {cat["id"]: cat["name"] for cat in gt["categories"]}
    precision = reference.eval["precision"]
    for k, cat_id in enumerate(reference.params.catIds):
        per_cat = precision[:, :, k, 0, -1]
        expected_ap = per_cat[per_cat > -1].mean() if (per_cat > -1).any() else -1.0
        expected_ap50 = per_cat[0][per_cat[0] > -1].mean() if (per_cat[0] > -1).any() else -1.0
        assert metrics["per_class"][cat_names[cat_id]]["AP"] == pytest.approx(expected_ap, abs=1e-9)
        assert metrics["per_class"][cat_names[cat_id]]["AP50"] == pytest.approx(expected_ap50, abs=1e-9)


def test_coco_metrics_leave_the_detections_unchanged(coco_tiny_ann):
    detections = _noisy_detections(json.loads(coco_tiny_ann.read_text()), seed=1)[:50]
    before = copy.deepcopy(detections)
    coco_metrics(COCO(str(coco_tiny_ann)), detections)
    assert detections == before


def test_perfect_detections_score_ap_one(coco_tiny_ann):
    gt = json.loads(coco_tiny_ann.read_text())
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    metrics = coco_metrics(COCO(str(coco_tiny_ann)), detections)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_empty_detections_give_all_zeros(coco_tiny_ann):
    metrics = coco_metrics(COCO(str(coco_tiny_ann)), [])
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert len(metrics["per_class"]) == 80
    assert all(v == {"AP": 0.0, "AP50": 0.0} for v in metrics["per_class"].values())


# --- evaluate_detector on a fake model whose outputs are the ground truth -------------------------------------------

TOY_GT = {
    "images": [{"id": 11, "width": 200, "height": 100}, {"id": 12, "width": 80, "height": 160}],
    "annotations": [
        {"id": 1, "image_id": 11, "category_id": 7, "bbox": [20.0, 10.0, 60.0, 40.0], "area": 2400.0, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "bbox": [100.0, 50.0, 80.0, 30.0], "area": 2400.0, "iscrowd": 0},
        {"id": 3, "image_id": 12, "category_id": 3, "bbox": [8.0, 16.0, 40.0, 80.0], "area": 3200.0, "iscrowd": 0},
    ],
    "categories": [{"id": 3, "name": "crack"}, {"id": 7, "name": "pit"}],
}
CATEGORY_IDS = [3, 7]  # contiguous label 0 → id 3, label 1 → id 7


class GroundTruthModel(nn.Module):
    """Emits 4 queries per image: the ground-truth boxes with a confident logit for their label, the rest empty."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        sizes = {img["id"]: (img["width"], img["height"]) for img in TOY_GT["images"]}
        self.outputs = {}
        for image_id, (width, height) in sizes.items():
            logits = torch.full((4, 2), -10.0)
            boxes = torch.full((4, 4), 0.5)
            anns = [a for a in TOY_GT["annotations"] if a["image_id"] == image_id]
            for q, ann in enumerate(anns):
                x, y, w, h = ann["bbox"]
                boxes[q] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
                logits[q, CATEGORY_IDS.index(ann["category_id"])] = 10.0
            self.outputs[image_id] = (logits, boxes)
        self.modes_seen = []

    def forward(self, images):
        self.modes_seen.append(self.training)
        ids = images[:, 0, 0, 0].long().tolist()  # the toy loader writes the image id into pixel (0, 0)
        logits = torch.stack([self.outputs[i][0] for i in ids]) * self.scale
        return {"pred_logits": logits, "pred_boxes": torch.stack([self.outputs[i][1] for i in ids])}


def _toy_loader():
    batches = []
    for img in TOY_GT["images"]:
        image = torch.zeros(1, 3, 8, 8)
        image[0, 0, 0, 0] = img["id"]
        target = {"image_id": torch.tensor([img["id"]]), "orig_size": torch.tensor([img["width"], img["height"]])}
        batches.append((image, [target]))
    return batches


def test_evaluate_detector_maps_labels_and_boxes_and_restores_train_mode():
    model = GroundTruthModel().train()
    coco_gt = COCO(copy.deepcopy(TOY_GT))
    metrics, detections = evaluate_detector(
        model,
        PostProcessor(num_classes=2, num_top_queries=8),
        _toy_loader(),
        torch.device("cpu"),
        CATEGORY_IDS,
        coco_gt,
        progress=False,
    )

    assert model.modes_seen == [False, False] and model.training
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["per_class"]["crack"]["AP"] == pytest.approx(1.0)
    confident = sorted(
        (d["image_id"], d["category_id"], *np.round(d["bbox"], 3)) for d in detections if d["score"] > 0.5
    )
    expected = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in TOY_GT["annotations"])
    assert confident == expected
    assert len(detections) == 16  # top-8 of 4 queries × 2 classes per image, no threshold


# --- gathering across ranks -----------------------------------------------------------------------------------------


def test_gather_detections_is_identity_in_a_single_process():
    detections = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    assert gather_detections(detections) is detections


def test_gather_detections_merges_ranks_and_drops_padding_duplicates(monkeypatch):
    rank0 = [{"image_id": 1, "score": 0.9}, {"image_id": 2, "score": 0.8}]
    rank1 = [{"image_id": 3, "score": 0.7}, {"image_id": 1, "score": 0.6}]  # image 1 again: sampler padding

    def fake_all_gather_object(output, obj):
        output[:] = [rank0, rank1]

    monkeypatch.setattr(evaluate.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(evaluate.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluate.dist, "all_gather_object", fake_all_gather_object)
    assert gather_detections(rank0) == [*rank0, rank1[0]]


# --- command line ---------------------------------------------------------------------------------------------------


def test_cli_json_output_has_all_metrics_and_per_class(coco_tiny_ann, tmp_path, capsys):
    detections = _noisy_detections(json.loads(coco_tiny_ann.read_text()), seed=2)
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(detections))

    assert main(["--ann", str(coco_tiny_ann), "--detections", str(dets_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {*METRIC_NAMES, "per_class"}
    assert result["AP"] == pytest.approx(coco_metrics(COCO(str(coco_tiny_ann)), detections)["AP"], abs=1e-12)
    assert set(result["per_class"]["person"]) == {"AP", "AP50"}


def test_cli_table_runs_as_module(coco_tiny_ann, tmp_path):
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(_noisy_detections(json.loads(coco_tiny_ann.read_text()), seed=3)))
    command = [sys.executable, "-m", "deim_lib.evaluate", "--ann", str(coco_tiny_ann), "--detections", str(dets_path)]
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:12]] == list(METRIC_NAMES)
    assert any(line.startswith("person ") for line in lines)


def test_the_table_prints_fractions_to_4_decimals_as_the_training_log_does():
    metrics = dict.fromkeys(METRIC_NAMES, 0.0) | {"AP": 0.2784723629366996, "APs": -1.0}
    metrics["per_class"] = {"person": {"AP": 0.33599, "AP50": 0.58530}, "toaster": {"AP": -1.0, "AP50": -1.0}}
    lines = format_table(metrics).splitlines()
    assert lines[0] == "    AP  0.2785" and lines[3] == "   APs       -"
    assert lines[-3:] == ["class        AP    AP50", "person   0.3360  0.5853", "toaster       -       -"]


@pytest.mark.parametrize("broken", ["missing", "not_json", "wrong_shape", "unknown_image"])
def test_cli_reports_bad_detections_file_with_exit_code_2(coco_tiny_ann, tmp_path, capsys, broken):
    dets_path = tmp_path / "dets.json"
    contents = {
        "not_json": "{oops",
        "wrong_shape": json.dumps({"image_id": 1}),
        "unknown_image": json.dumps([{"image_id": -5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]),
    }
    if broken in contents:
        dets_path.write_text(contents[broken])

    assert main(["--ann", str(coco_tiny_ann), "--detections", str(dets_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dets_path) in err


def test_cli_reports_missing_ground_truth_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["--ann", str(missing), "--detections", str(tmp_path / "dets.json")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "ground-truth" in err
