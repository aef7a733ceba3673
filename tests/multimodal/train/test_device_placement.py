"""Device placement, proven without a GPU: the training step (forward, loss, backward, clipping, AdamW, EMA), evaluation
and ``predict`` run on the simulated second device of ``simulated_device``.

There an operation that mixes device tensors with host tensors fails, as on CUDA, and every copy between host and
device and every read of device values by the host is listed with the code that caused it. The lists below are the
deliberate ones, each with its reason; any other crossing fails the test with its place in the code.
"""

import copy
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.throughput import synthetic_batch
from deim_lib import PostProcessor, build_detector, get_variant
from deim_lib.criterion import deim_criterion
from deim_lib.evaluate import evaluate_detector
from deim_lib.variants import HybridEncoderConfig
from multimodal.config import DataConfig, TrainConfig
from multimodal.data import loaders
from multimodal.model.detector import MultimodalDetector, attach_text
from multimodal.tools.predict import InferenceModel, predict
from multimodal.train import step
from multimodal.train.freezing import constant_parameters
from tests.multimodal.train.simulated_device import DEVICE, DevicePlacementError, SimulatedDevice, Transfer

IMAGE_SIZES = {"atto": 160, "s": 128}  # the smallest inputs with at least as many feature cells as queries
NUM_CLASSES = 5  # the classes of the generated dataset of ``tiny_data``
MATCHER = "deim_lib/criterion/matcher.py"
CRITERION = "deim_lib/criterion/deim_criterion.py"
# Every crossing of one training step, with its reason. On CUDA the non-blocking copies come from pinned memory and
# do not wait; each other copy and each host read waits for the GPU to finish the work queued before it.
STEP_TRANSFERS = {
    Transfer("to device, non-blocking", f"{MATCHER}:host_to_device ← {MATCHER}:_match"): (
        "the positions of each image's own block in the cost matrices, computed on the host from the box counts"
    ),
    Transfer("to host", f"{MATCHER}:_match ← {MATCHER}:forward"): (
        "each image's cost blocks, for scipy's Hungarian assignment on the host"
    ),
    Transfer("to device, non-blocking", f"{MATCHER}:host_to_device ← {CRITERION}:_gather_matched"): (
        "the (image, query, target) rows of every matching, in one copy"
    ),
    Transfer("host read", "multimodal/train/step.py:train_step"): (
        "whether loss, gradient norm and outputs are finite: a bad step is skipped (on every rank)"
    ),
}
LOCAL_LOSS_TRANSFERS = {  # the variants with FGL and DDF losses (s and larger)
    Transfer("to host", f"{CRITERION}:_distilled_outputs ← {CRITERION}:forward"): (
        "which decoder layers' corners differ from their teacher's: official DEIMv2 gives equal ones no DDF term"
    ),
}
ENCODER = "deim_lib/encoder/hybrid_encoder.py"
TRAINING_ENCODER_TRANSFERS = {  # the HybridEncoder (s and larger) in train mode: phase 0 only
    Transfer("to device", f"{ENCODER}:_position_embedding ← {ENCODER}:forward"): (
        "the training-mode position table, built on the host for the input's size at every forward"
    ),
}
EVALUATION_TRANSFERS = {
    Transfer("to device", "deim_lib/evaluate.py:evaluate_detector"): "each batch of images and their sizes",
    Transfer("to host", "deim_lib/evaluate.py:coco_results ← deim_lib/evaluate.py:evaluate_detector"): (
        "each image's detections, written as COCO results"
    ),
}
PREDICT_TRANSFERS = {
    Transfer(
        "to device", "multimodal/tools/predict.py:detect ← multimodal/tools/predict.py:predict"
    ): "each batch and its sizes",
    Transfer(
        "to host", "multimodal/tools/predict.py:detect ← multimodal/tools/predict.py:predict"
    ): "each image's detections",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: two OpenMP workers spin against other jobs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_step_transfers(variant: str, index: int) -> dict[Transfer, str]:
    spec = get_variant(variant)
    expected = STEP_TRANSFERS | (LOCAL_LOSS_TRANSFERS if spec.use_local_losses else {})
    training_hybrid_encoder = index == 0 and isinstance(spec.encoder, HybridEncoderConfig)
    return expected | (TRAINING_ENCODER_TRANSFERS if training_hybrid_encoder else {})


def unexpected(transfers: list[Transfer], expected: dict[Transfer, str], once: bool) -> list[str]:
    """The crossings that are not ``expected`` (or, with ``once``, that happen more than once), and the expected
    ones that did not happen: the list the tests need empty."""
    counts = Counter(transfers)
    problems = [f"{transfer} not expected ({count}×)" for transfer, count in counts.items() if transfer not in expected]
    problems += [
        f"{transfer} {count}× instead of once"
        for transfer, count in counts.items()
        if once and count > 1 and transfer in expected
    ]
    return problems + [f"{transfer} did not happen" for transfer in expected if transfer not in counts]


def multimodal_model(variant: str, index: int) -> torch.nn.Module:
    """A seeded ``variant`` (with the text fusion from phase 1, open, so that it shapes the outputs) whose box heads
    are not zero: decoder layers then differ and the DDF loss of s runs."""
    torch.manual_seed(0)
    size = IMAGE_SIZES[variant]
    model = build_detector(variant, NUM_CLASSES, eval_size=(size, size))
    with torch.no_grad():
        for head in model.decoder.dec_bbox_head:
            for parameter in head.parameters():
                parameter.normal_(0.0, 0.02)
    if index > 0:
        model = attach_text(model, F.normalize(torch.randn(NUM_CLASSES, 32), dim=-1))
        with torch.no_grad():
            for level in model.fusion.levels:
                level.output.weight.normal_(0.0, 0.3)
        return model
    return MultimodalDetector(model)


def step_transfers(variant: str, index: int) -> list[Transfer]:
    """One training step of phase ``index`` on the simulated device, set up as train_progressive.py does, and the
    crossings of the step alone (forward, criterion, backward, clipping, AdamW, EMA)."""
    model = multimodal_model(variant, index)
    images, targets = synthetic_batch(2, IMAGE_SIZES[variant], NUM_CLASSES, 3, torch.device("cpu"), seed=1)
    phase = replace(TrainConfig().phase(index), amp=False)  # float32: autocast has no rules for the meta device
    with SimulatedDevice() as device:
        model.to(DEVICE)
        images, targets = images.to(DEVICE), [{k: v.to(DEVICE) for k, v in t.items()} for t in targets]
        # After the move: .to() gives simulated tensors new parameter objects (on CUDA it keeps them).
        constants = constant_parameters(model)
        setup = step.build_phase(
            index=index,
            config=phase,
            model=model,
            constants=constants,
            variant=get_variant(variant),
            num_classes=NUM_CLASSES,
            device=DEVICE,
        )
        setup.train_mode()
        device.transfers.clear()
        _, taken = step.train_step(setup, images, targets, epoch=0)
    assert taken and setup.ema.updates == 1
    return device.transfers


@pytest.mark.parametrize("index", [0, 1, 2, 3])
@pytest.mark.parametrize("variant", ["atto", "s"])
def test_device_placement_of_the_training_step(variant, index):
    transfers = step_transfers(variant, index)
    assert unexpected(transfers, expected_step_transfers(variant, index), once=True) == []


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_device_placement_of_evaluation_and_predict(variant, tiny_data, tmp_path):
    model = multimodal_model(variant, 1).eval()
    size = IMAGE_SIZES[variant]
    data = DataConfig(**{key: str(path) for key, path in tiny_data.items()})
    dataset = loaders.build_val_dataset(data, get_variant(variant), size)
    loader = loaders.build_val_loader(dataset, batch_size=4, num_workers=0)
    names = dataset.class_names
    inference = InferenceModel(copy.deepcopy(model), PostProcessor(NUM_CLASSES), names, size, None, variant)
    with SimulatedDevice() as device:
        model.to(DEVICE)
        device.transfers.clear()
        metrics, detections = evaluate_detector(
            model, PostProcessor(NUM_CLASSES), loader, DEVICE, dataset.category_ids, dataset.coco, progress=False
        )
        evaluation = list(device.transfers)
        device.transfers.clear()
        results, _ = predict(inference, Path(tiny_data["val_images"]), tmp_path, DEVICE, batch_size=4)
    assert len(detections) == len(dataset) * 300 and 0 <= metrics["AP"] <= 1
    assert len(results) == len(dataset) * 300
    assert unexpected(evaluation, EVALUATION_TRANSFERS, once=False) == []
    assert unexpected(device.transfers, PREDICT_TRANSFERS, once=False) == []


def test_device_placement_catches_a_tensor_the_criterion_makes_on_the_host(monkeypatch):
    """The planted device bug: ``torch.zeros(n)`` without ``device=`` inside the criterion."""
    paired_iou = deim_criterion._paired_iou

    def paired_iou_plus_host_zeros(pred_boxes, target_boxes):
        return paired_iou(pred_boxes, target_boxes) + torch.zeros(len(pred_boxes))

    monkeypatch.setattr(deim_criterion, "_paired_iou", paired_iou_plus_host_zeros)
    with pytest.raises(DevicePlacementError, match=rf"host tensors of shape \(\d+,\) at {CRITERION}:\d+"):
        step_transfers("atto", 1)


def test_device_placement_catches_a_new_host_read_in_the_criterion(monkeypatch):
    """The planted sync: a check that reads device values inside the loss (on CUDA a wait for the GPU per call)."""
    loss_mal = deim_criterion.DEIMCriterion._loss_mal

    def checked_loss_mal(self, output, matched, num_boxes):
        if not torch.isfinite(output["pred_logits"]).all():
            raise ValueError("non-finite logits")
        return loss_mal(self, output, matched, num_boxes)

    monkeypatch.setattr(deim_criterion.DEIMCriterion, "_loss_mal", checked_loss_mal)
    problems = unexpected(step_transfers("atto", 1), expected_step_transfers("atto", 1), once=True)
    planted = Transfer("host read", f"{CRITERION}:_output_losses ← {CRITERION}:forward")
    assert len(problems) == 1 and problems[0].startswith(f"{planted} not expected")
