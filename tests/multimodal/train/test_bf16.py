"""bf16 autocast on the CPU: the training step, evaluation, ``predict`` and ``interpolate`` run the mixed-precision code
a GPU runs, here where there is none.

The step's autocast follows the images' device, so ``amp: true`` on the CPU exercises what CUDA does by default: the
forward and the text fusion in bf16, the DEIMv2 criterion on float32 upcasts of the outputs, and weights, gradients,
optimiser and EMA state that stay float32.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.throughput import synthetic_batch
from deim_lib import PostProcessor, build_detector, get_variant, load_official_checkpoint
from deim_lib.evaluate import coco_metrics, evaluate_detector
from multimodal.config import DataConfig, TrainConfig, config_from_values, config_to_dict, load_config
from multimodal.data import loaders
from multimodal.model.detector import MultimodalDetector, attach_text, split_state
from multimodal.model.text_encoder import TextEmbeddings
from multimodal.tools.interpolate import interpolate
from multimodal.tools.predict import load_for_inference, predict
from multimodal.train import step
from multimodal.train.checkpoint import PhaseCheckpoint, PhaseProgress, RunInfo, TrainingState, save_phase_checkpoint
from multimodal.train.freezing import FrozenTensorChangedError, constant_parameters

IMAGE_SIZES = {"atto": 160, "s": 128}  # the smallest inputs with at least as many feature cells as queries
NUM_CLASSES = 5
# Measured on the synthetic batch below: the bf16 total loss lies within 5e-4 relative of float32's (atto and s,
# phases 0–3); single terms move by up to 1.2 %.
LOSS_RTOL = 1e-2
VAL_IMAGES = 40  # the first ones of coco-tiny val, in one batch
# Measured with the real DEIMv2-Atto, bf16 autocast against float32: AP −0.015 on these 40 images (0.2988 against
# 0.3135), +0.008 on all 80 (0.2868 against 0.2785): the noise of so few images, in either direction.
AP_TOLERANCE = 0.03


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the tolerances below were measured (bf16 results depend on how work is split), and because two
    OpenMP workers spin against other jobs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# --- the training step ------------------------------------------------------------------------------------------------


class FloatingDtypes(TorchDispatchMode):
    """While active: the dtypes of every floating tensor that an operation takes or returns."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = (t for t in tree_leaves((args, kwargs, result)) if isinstance(t, Tensor))
        self.seen.update(t.dtype for t in tensors if t.is_floating_point())
        return result


@contextmanager
def dtypes_inside(module: nn.Module) -> Iterator[set[torch.dtype]]:
    """The floating dtypes the operations of every ``module`` call use (its forward only, not its backward)."""
    recorder = FloatingDtypes()

    def enter(*_) -> None:
        recorder.__enter__()

    def leave(*_) -> None:
        recorder.__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield recorder.seen
    finally:
        for handle in handles:
            handle.remove()


def phase_setup(variant: str, index: int, amp: bool, text: Tensor | None = None) -> step.Phase:
    """Phase ``index`` of a seeded ``variant`` (from phase 1 with the text fusion for ``text``, random rows if None, at
    its identity start), set up as train_progressive.py does."""
    torch.manual_seed(0)
    size = IMAGE_SIZES[variant]
    model = build_detector(variant, NUM_CLASSES, eval_size=(size, size))
    constants = constant_parameters(model)
    if index > 0:
        model = attach_text(model, F.normalize(torch.randn(NUM_CLASSES, 32), dim=-1) if text is None else text)
    else:
        model = MultimodalDetector(model)
    phase = replace(TrainConfig().phase(index), amp=amp, amp_on_cpu=amp)
    cpu = torch.device("cpu")
    setup = step.build_phase(
        index=index,
        config=phase,
        model=model,
        constants=constants,
        variant=get_variant(variant),
        num_classes=NUM_CLASSES,
        device=cpu,
    )
    setup.train_mode()
    return setup


def precision_problems(setup: step.Phase, trainable: list[str], images: Tensor, targets: list[dict]):
    """One ``train_step``; returns its loss terms and what is wrong with its precision or what it trained.

    Checked: the step is taken with finite float32 loss terms computed by the criterion in float32 only; gradients
    exist on trainable parameters only and reach every trainable part; frozen tensors are bit-identical; weights,
    gradients, optimiser state and EMA weights are float32.
    """
    torch.manual_seed(7)  # the denoising queries are drawn at random: the same draws for both precisions
    with dtypes_inside(setup.criterion) as criterion_dtypes:
        losses, taken = step.train_step(setup, images, targets, epoch=0)
    problems = [] if taken else ["the step was skipped"]
    problems += [f"loss term {name} is {value}" for name, value in losses.items() if not torch.isfinite(value)]
    problems += [f"loss term {name} is {v.dtype}" for name, v in losses.items() if v.dtype != torch.float32]
    if criterion_dtypes != {torch.float32}:
        problems.append(f"the criterion computed in {sorted(map(str, criterion_dtypes))}")

    parameters = dict(setup.model.named_parameters())
    in_trainable_parts = {id(p) for part in trainable for module in setup.parts[part] for p in module.parameters()}
    problems += [
        f"gradient outside {trainable}: {name}"
        for name, p in parameters.items()
        if p.grad is not None and id(p) not in in_trainable_parts
    ]
    for part in trainable:
        grads = [p.grad for module in setup.parts[part] for p in module.parameters() if p.grad is not None]
        if not any(grad.abs().sum() > 0 for grad in grads):
            problems.append(f"no gradient reaches {part}")
    try:
        setup.policy.verify_frozen(setup.model)
    except FrozenTensorChangedError as error:
        problems.append(str(error))

    ema = setup.ema.module.state_dict() if setup.ema is not None else {}
    tensors = {f"weight {name}": p for name, p in parameters.items()}
    tensors |= {f"gradient {name}": p.grad for name, p in parameters.items() if p.grad is not None}
    tensors |= {f"EMA {name}": value for name, value in ema.items()}
    for index, state in enumerate(setup.optimizer.state.values()):
        tensors |= {f"optimiser {key} #{index}": value for key, value in state.items()}
    problems += [
        f"{what} is {value.dtype}"
        for what, value in tensors.items()
        if value.is_floating_point() and value.dtype != torch.float32
    ]
    return losses, problems


@pytest.mark.parametrize("index", [0, 1, 2, 3])
@pytest.mark.parametrize("variant", ["atto", "s"])
def test_bf16_step_trains_the_phase_parts_in_float32_state_near_the_float32_loss(variant, index):
    images, targets = synthetic_batch(2, IMAGE_SIZES[variant], NUM_CLASSES, 3, torch.device("cpu"), seed=1)
    trainable = TrainConfig().phase(index).trainable
    bf16, reference = phase_setup(variant, index, amp=True), phase_setup(variant, index, amp=False)
    assert bf16.use_amp and not reference.use_amp

    losses, problems = precision_problems(bf16, trainable, images, targets)
    reference_losses, reference_problems = precision_problems(reference, trainable, images, targets)
    assert problems == [] and reference_problems == []
    assert losses.keys() == reference_losses.keys()
    total, reference_total = (float(sum(terms.values()).detach()) for terms in (losses, reference_losses))
    assert total == pytest.approx(reference_total, rel=LOSS_RTOL)


def test_bf16_check_catches_outputs_that_reach_the_criterion_in_bf16(monkeypatch):
    """The planted dtype bug: the step forgets to upcast the bf16 outputs before the loss."""
    monkeypatch.setattr(step, "float32", lambda outputs: outputs)
    images, targets = synthetic_batch(2, IMAGE_SIZES["atto"], NUM_CLASSES, 3, torch.device("cpu"), seed=1)
    _, problems = precision_problems(phase_setup("atto", 1, amp=True), ["fusion"], images, targets)
    assert "the criterion computed in ['torch.bfloat16', 'torch.float32']" in problems


def test_bf16_fusion_gradient_with_similar_class_texts_is_near_float32s():
    """At the start of phase 1 only the fusion's output projections get a gradient. With class rows as alike as CLIP's
    "a <class>" embeddings (cosine 0.85), it was 88 % off float32's for atto while the fusion ran in bf16; the fusion
    computes in float32 under autocast, which leaves the bf16 noise of the rest of the network (9 %)."""
    generator = torch.Generator().manual_seed(5)
    common = F.normalize(torch.randn(512, generator=generator), dim=0)
    text = F.normalize(common + 0.0185 * torch.randn(NUM_CLASSES, 512, generator=generator), dim=-1)
    images, targets = synthetic_batch(2, IMAGE_SIZES["atto"], NUM_CLASSES, 3, torch.device("cpu"), seed=1)
    gradients = []
    for amp in (True, False):
        setup = phase_setup("atto", 1, amp, text)
        torch.manual_seed(7)
        step.train_step(setup, images, targets, epoch=0)
        gradients.append(torch.cat([level.output.weight.grad.flatten() for level in setup.model.fusion.levels]))
    bf16, reference = gradients
    assert (bf16 - reference).norm() / reference.norm() < 0.15


def test_bf16_is_the_default_on_cuda_only_and_amp_on_cpu_asks_for_it_there():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step.uses_bf16(True, False, cuda) and not step.uses_bf16(True, False, cpu)
    assert step.uses_bf16(True, True, cpu) and not step.uses_bf16(False, True, cuda)
    assert TrainConfig().phase(1).amp is True and TrainConfig().phase(1).amp_on_cpu is False
    # A config stored before amp_on_cpu existed (amp: true meant CUDA only) keeps that meaning.
    stored = config_to_dict(load_config(None, ["data.synthetic_dir=data"]))
    del stored["phase1"]["amp_on_cpu"]
    assert config_from_values(stored).phase1.amp_on_cpu is False


# --- evaluation, predict and interpolate under autocast, on the real DEIMv2-Atto --------------------------------------


@pytest.fixture(scope="module")
def coco_tiny(tmp_path_factory, real_atto, coco_clip, datasets_dir) -> dict:
    """The real atto as an official checkpoint and as a fine-tuned phase-1 checkpoint (its fusion open), and a config
    whose validation set is the first ``VAL_IMAGES`` images of coco-tiny val (in a folder of their own, for predict)."""
    folder = tmp_path_factory.mktemp("bf16")
    source = datasets_dir / "coco-tiny"
    ground_truth = json.loads((source / "annotations" / "instances_val2017.json").read_text())
    kept = ground_truth["images"][:VAL_IMAGES]
    ids = {image["id"] for image in kept}
    boxes = [annotation for annotation in ground_truth["annotations"] if annotation["image_id"] in ids]
    annotations = folder / "val.json"
    annotations.write_text(json.dumps(ground_truth | {"images": kept, "annotations": boxes}))
    images = folder / "images"
    images.mkdir()
    for image in kept:
        (images / image["file_name"]).symlink_to(source / "val2017" / image["file_name"])
    paths = {"images": str(images), "annotations": str(annotations)}
    data = {f"{split}_{kind}": path for split in ("train", "val") for kind, path in paths.items()}
    config = folder / "config.yaml"
    settings = {"val_batch_size": VAL_IMAGES, "num_workers": 0}
    config.write_text(yaml.safe_dump({"model": {"variant": "atto"}, "data": data | settings}))

    dataset = loaders.build_val_dataset(DataConfig(**data), get_variant("atto"), 320)
    text = F.normalize(torch.from_numpy(np.load(coco_clip)).float(), dim=-1)
    detector = build_detector("atto", len(dataset.class_names), eval_size=(320, 320))
    detector.load_state_dict(load_official_checkpoint(real_atto), strict=True)
    tuned = attach_text(detector, text)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for level in tuned.fusion.levels:
            level.output.weight.copy_(0.3 * torch.randn(level.output.weight.shape, generator=generator))
    finetuned = folder / "phase1_best.pth"
    detector_state, fusion_state = split_state(tuned.state_dict())
    names = dataset.class_names
    checkpoint = PhaseCheckpoint(
        phase=1,
        kind="best",
        info=RunInfo("atto", 320, names, dataset.category_ids, {"fusion": {"num_heads": 8}}, seed=0),
        progress=PhaseProgress(TrainingState(epoch=1, step=1), ["run0"]),
        detector=detector_state,
        fusion=fusion_state,
        ema_detector=detector_state,
        ema_fusion=fusion_state,
        ema_updates=1,
        text_embeddings=TextEmbeddings(text, names, {name: [] for name in names}, "coco_clip").to_dict(),
        finished=True,
    )
    save_phase_checkpoint(finetuned, checkpoint)
    return {"base": real_atto, "finetuned": finetuned, "config": config, "dataset": dataset, "paths": paths}


def evaluate(model: nn.Module, coco_tiny: dict) -> tuple[dict, list[dict]]:
    dataset = coco_tiny["dataset"]
    loader = loaders.build_val_loader(dataset, batch_size=VAL_IMAGES, num_workers=0)
    postprocessor = PostProcessor(len(dataset.class_names))
    cpu = torch.device("cpu")
    return evaluate_detector(model, postprocessor, loader, cpu, dataset.category_ids, dataset.coco, progress=False)


@pytest.fixture(scope="module")
def tuned_ap(coco_tiny) -> dict[str, float]:
    """AP of the fine-tuned checkpoint's model in float32 and under bf16 autocast."""
    model = load_for_inference(coco_tiny["finetuned"]).model
    metrics = {"float32": evaluate(model, coco_tiny)[0]}
    with bf16_autocast():
        metrics["bf16"], detections = evaluate(model, coco_tiny)
    assert all(np.isfinite(d["bbox"]).all() and np.isfinite(d["score"]) for d in detections)
    return {precision: values["AP"] for precision, values in metrics.items()}


def test_bf16_evaluation_gives_the_float32_ap(tuned_ap):
    assert tuned_ap["float32"] > 0.1  # the real detector: a meaningful comparison
    assert tuned_ap["bf16"] == pytest.approx(tuned_ap["float32"], abs=AP_TOLERANCE)


def test_bf16_predict_writes_the_detections_that_evaluation_scores(coco_tiny, tuned_ap, tmp_path):
    inference = load_for_inference(coco_tiny["finetuned"])
    images, ann = (Path(coco_tiny["paths"][key]) for key in ("images", "annotations"))
    with bf16_autocast():
        results, _ = predict(inference, images, tmp_path, torch.device("cpu"), batch_size=VAL_IMAGES, ann=ann)
    written = json.loads((tmp_path / "detections.json").read_text())
    assert written == results and all(isinstance(d["score"], float) for d in written)
    assert coco_metrics(coco_tiny["dataset"].coco, written)["AP"] == pytest.approx(tuned_ap["bf16"], abs=1e-9)


def test_bf16_interpolate_ends_are_the_base_and_the_fine_tuned_model(coco_tiny, tuned_ap, tmp_path):
    base = load_for_inference(coco_tiny["base"]).model  # weight 0 adds the identity fusion: nothing
    # Without autocast's cache: interpolate loads each mix into the same parameters, and the cached bf16 copies of
    # parameters live as long as the autocast region, so every weight would be evaluated with the first one's.
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        base_ap = evaluate(base, coco_tiny)[0]["AP"]
        record = interpolate(
            str(coco_tiny["base"]), str(coco_tiny["finetuned"]), [0.0, 1.0], tmp_path, str(coco_tiny["config"])
        )
    assert [point["AP"] for point in record["points"]] == pytest.approx([base_ap, tuned_ap["bf16"]], abs=1e-9)
    mixed = torch.load(tmp_path / "wise_ft.pth", weights_only=True)
    floating = [value for value in tree_leaves(mixed) if isinstance(value, Tensor) and value.is_floating_point()]
    assert floating and all(value.dtype == torch.float32 for value in floating)
