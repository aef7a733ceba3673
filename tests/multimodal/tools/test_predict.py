"""Inference CLI: checkpoint loading (ours with and without fusion, official), validation preprocessing, COCO results
equal to the PyTorch post-processing, drawn PNGs, skipped unreadable files and one-line errors."""

import contextlib
import copy
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faster_coco_eval import COCO
from PIL import Image
from torch import nn

from deim_lib.checkpoint import CheckpointError, load_official_checkpoint
from deim_lib.data.dataset import CocoDetection
from deim_lib.data.transforms import build_val_transforms
from deim_lib.evaluate import evaluate_detector
from deim_lib.evaluate import main as evaluate_main
from deim_lib.model import build_detector
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import IMAGENET_MEAN, IMAGENET_STD
from multimodal.data.loaders import build_val_loader
from multimodal.model.detector import MultimodalDetector, attach_text, split_state
from multimodal.model.text_encoder import TextEmbeddings
from multimodal.tools.export import main as export_main
from multimodal.tools.predict import (
    PALETTE,
    TAG_PADDING,
    InferenceModel,
    draw_detections,
    find_images,
    label_font,
    load_for_inference,
    main,
    place_labels,
    shown_detections,
    visualization_names,
)
from multimodal.train.checkpoint import PhaseCheckpoint, PhaseProgress, RunInfo, TrainingState, save_phase_checkpoint
from tests.conftest import PROJECT_DIR, SHARED_DIR

ATTO_CHECKPOINT = SHARED_DIR / "reference" / "deimv2_atto_c6.pth"  # used only by tests that take `reference_dir`
CLASS_NAMES = ["crazing", "inclusion", "patches", "pitted", "rolled-in", "scratches"]
CATEGORY_IDS = [3, 5, 8, 13, 21, 34]  # the dataset's ids, with gaps, as COCO's
NUM_HEADS = 4  # not the default 8: the loader must take it from the checkpoint's config


def text_embeddings(num_classes: int = 6, text_dim: int = 32) -> TextEmbeddings:
    rows = F.normalize(torch.randn(num_classes, text_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    names = CLASS_NAMES[:num_classes]
    return TextEmbeddings(rows, names, {name: [name] for name in names}, "random test rows")


def trained_multimodal_model() -> MultimodalDetector:
    """Reference atto weights (realistic activations) + a fusion, classifier and class head that moved."""
    torch.manual_seed(0)
    detector = build_detector("atto", len(CLASS_NAMES))
    detector.load_state_dict(load_official_checkpoint(ATTO_CHECKPOINT), strict=True)
    model = attach_text(detector, text_embeddings().embeddings, NUM_HEADS, text_aware_classification=True)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for level in model.fusion.levels:
            level.output.weight.copy_(0.3 * torch.randn(level.output.weight.shape, generator=generator))
        model.text_classifier.query_proj.weight.copy_(torch.randn(model.text_classifier.query_proj.weight.shape))
        model.detector.decoder.dec_score_head[-1].bias.add_(torch.linspace(-0.5, 0.5, len(CLASS_NAMES)))
    return model.eval()


def write_training_checkpoint(path: Path, phase: int) -> nn.Module:
    """A best checkpoint as train_progressive.py writes it; returns the model its EMA weights give.

    ``model`` / ``fusion`` hold the untouched base (identity fusion) so that reading them instead of the EMA shows.
    """
    trained = trained_multimodal_model()
    base = attach_text(build_detector("atto", len(CLASS_NAMES)), text_embeddings().embeddings, NUM_HEADS, True)
    base.detector.load_state_dict(load_official_checkpoint(ATTO_CHECKPOINT), strict=True)
    if phase == 0:
        trained, base = trained.detector, base.detector
    model_state, fusion_state = split_state(base.state_dict())
    ema_state, ema_fusion = split_state(trained.state_dict())
    config = {"fusion": {"num_heads": NUM_HEADS, "text_aware_classification": True}, "model": {"variant": "atto"}}
    info = RunInfo("atto", 320, CLASS_NAMES, CATEGORY_IDS, config, seed=0)
    checkpoint = PhaseCheckpoint(
        phase=phase,
        kind="best",
        info=info,
        progress=PhaseProgress(TrainingState(epoch=1, step=7), ["run0"]),
        detector=model_state,
        fusion=fusion_state,
        ema_detector=ema_state,
        ema_fusion=ema_fusion,
        ema_updates=7,
        text_embeddings=text_embeddings().to_dict() if phase >= 1 else None,
        finished=False,
    )
    save_phase_checkpoint(path, checkpoint)
    return trained


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_dir) -> dict:
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {"phase2": folder / "phase2_best.pth", "phase0": folder / "phase0_best.pth"}
    models = {name: write_training_checkpoint(path, int(name[-1])) for name, path in paths.items()}
    return {"paths": paths, "models": models}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, reference_dir) -> Path:
    """Two readable images of different sizes and formats, a corrupt .jpg, and a text file that is not an input."""
    folder = tmp_path_factory.mktemp("images")
    pixels = torch.load(reference_dir / "deimv2_atto_c6_io.pt", weights_only=True)["images_uint8"]
    first, second = (Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels)
    first.resize((400, 300)).save(folder / "a_first.png")
    (folder / "nested").mkdir()
    second.resize((250, 330)).save(folder / "nested" / "c_second.jpg", quality=95)
    (folder / "b_broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "notes.txt").write_text("ignored")
    return folder


def assert_same_state(model: nn.Module, expected: nn.Module) -> None:
    state, wanted = model.state_dict(), expected.state_dict()
    assert list(state) == list(wanted)
    assert all(torch.equal(state[key], wanted[key]) for key in wanted)


def test_training_checkpoint_loads_ema_fusion_with_config_heads_and_text_constants(checkpoints):
    inference = load_for_inference(checkpoints["paths"]["phase2"])
    assert inference.model.uses_text and not inference.model.training
    assert_same_state(inference.model, checkpoints["models"]["phase2"])  # EMA weights, not the decoy ``model``
    assert inference.model.text_classifier is not None
    assert inference.model.fusion.levels[0].num_heads == NUM_HEADS
    assert torch.equal(inference.model.text_embeddings, text_embeddings().embeddings)
    assert (inference.class_names, inference.image_size, inference.normalize, inference.variant) == (
        CLASS_NAMES,
        320,
        None,
        "atto",
    )
    assert inference.category_ids == CATEGORY_IDS


def test_phase0_checkpoint_loads_as_the_detector_without_text(checkpoints):
    inference = load_for_inference(checkpoints["paths"]["phase0"])
    assert type(inference.model) is MultimodalDetector and not inference.model.uses_text
    assert_same_state(inference.model.detector, checkpoints["models"]["phase0"])


def test_training_checkpoint_with_fusion_but_no_text_embeddings_is_a_checkpoint_error(checkpoints, tmp_path):
    checkpoint = torch.load(checkpoints["paths"]["phase2"], weights_only=True)
    checkpoint["text_embeddings"] = None
    torch.save(checkpoint, tmp_path / "no_text.pth")
    with pytest.raises(CheckpointError, match=r"no_text\.pth: has text-fusion weights but no text embeddings"):
        load_for_inference(tmp_path / "no_text.pth")


def test_training_checkpoint_with_foreign_text_or_no_fusion_config_is_a_checkpoint_error(checkpoints, tmp_path):
    original = torch.load(checkpoints["paths"]["phase2"], weights_only=True)
    foreign = copy.deepcopy(original)
    foreign["text_embeddings"]["class_names"] = list(reversed(foreign["text_embeddings"]["class_names"]))
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"foreign\.pth: its text embeddings describe other classes"):
        load_for_inference(tmp_path / "foreign.pth")
    del original["config"]["fusion"]
    torch.save(original, tmp_path / "no_fusion.pth")
    with pytest.raises(CheckpointError, match=r"no_fusion\.pth: its config has no fusion\.num_heads"):
        load_for_inference(tmp_path / "no_fusion.pth")


def test_official_checkpoint_loads_ema_weights_with_guessed_variant_and_generic_names(reference_dir):
    inference = load_for_inference(ATTO_CHECKPOINT)
    assert (inference.variant, inference.image_size, inference.normalize) == ("atto", 320, None)
    assert inference.class_names == [f"class_{k}" for k in range(6)] and inference.category_ids is None
    official = load_official_checkpoint(ATTO_CHECKPOINT)
    assert all(torch.equal(inference.model.detector.state_dict()[key], official[key].float()) for key in official)
    assert load_for_inference(ATTO_CHECKPOINT, CLASS_NAMES).class_names == CLASS_NAMES
    with pytest.raises(CheckpointError, match="6 classes, but 2 class names"):
        load_for_inference(ATTO_CHECKPOINT, ["cat", "dog"])


@pytest.mark.parametrize("normalize", [None, (IMAGENET_MEAN, IMAGENET_STD)], ids=["hgnetv2", "dinov3"])
def test_preprocess_resizes_bilinear_on_pil_then_scales_and_normalises(normalize):
    inference = InferenceModel(nn.Identity(), PostProcessor(1), ["x"], 64, normalize, "atto")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    expected = torch.from_numpy(np.array(image.resize((64, 64), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    if normalize is not None:
        expected = (expected - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    result = inference.preprocess(image)
    assert type(result) is torch.Tensor and result.dtype == torch.float32
    assert torch.allclose(result, expected, atol=1e-6)


@pytest.fixture(scope="module")
def prediction(checkpoints, image_folder, tmp_path_factory) -> tuple[Path, str]:
    """One CLI run over the folder (batch of 3 files: both images and the broken one); (output folder, stderr).

    The drawings suppress duplicates (--draw-nms), which must leave the JSON whole."""
    output = tmp_path_factory.mktemp("prediction")
    args = ["--checkpoint", str(checkpoints["paths"]["phase2"]), "--images", str(image_folder), "--output", str(output)]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert main([*args, "--batch-size", "3", "--device", "cpu", "--threshold", "0.1", "--draw-nms", "0.5"]) == 0
    return output, errors.getvalue()


def test_predict_writes_coco_results_equal_to_pytorch_postprocessing(prediction, checkpoints, image_folder):
    output, _ = prediction
    detections = json.loads((output / "detections.json").read_text())
    index = json.loads((output / "images.json").read_text())
    # Ids count the sorted image files from 1; the broken one (the second) is left out.
    assert [(entry["id"], entry["file_name"], entry["width"], entry["height"]) for entry in index["images"]] == [
        (1, "a_first.png", 400, 300),
        (3, "nested/c_second.jpg", 250, 330),
    ]
    assert index["categories"] == [{"id": i, "name": name} for i, name in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)]
    annotation = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0}
    ground_truth = COCO({**index, "annotations": [annotation]})
    assert len(ground_truth.loadRes([dict(d) for d in detections]).getAnnIds()) == 2 * 300  # no threshold in JSON

    inference = load_for_inference(checkpoints["paths"]["phase2"])
    images = [Image.open(image_folder / entry["file_name"]).convert("RGB") for entry in index["images"]]
    with torch.no_grad():
        outputs = inference.model(torch.stack([inference.preprocess(image) for image in images]))
        expected = inference.postprocessor(outputs, torch.tensor([image.size for image in images]))
    for entry, result in zip(index["images"], expected, strict=True):
        ours = [d for d in detections if d["image_id"] == entry["id"]]
        assert len(ours) == 300
        assert torch.allclose(torch.tensor([d["score"] for d in ours]), result["scores"], atol=1e-6)
        assert [d["category_id"] for d in ours] == [CATEGORY_IDS[label] for label in result["labels"].tolist()]
        # Unclipped, as --eval-only scores them: clipping changes the IoU of a box that reaches past the edge.
        x0, y0, x1, y1 = result["boxes"].unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)
        assert torch.allclose(torch.tensor([d["bbox"] for d in ours]), xywh, atol=1e-4)
    sizes = {entry["id"]: (entry["width"], entry["height"]) for entry in index["images"]}
    outside = [
        d
        for d in detections
        if min(d["bbox"][:2]) < 0
        or d["bbox"][0] + d["bbox"][2] > sizes[d["image_id"]][0]
        or d["bbox"][1] + d["bbox"][3] > sizes[d["image_id"]][1]
    ]
    assert outside, "no box reaches past the image's edge: the test cannot tell clipped from unclipped"


def test_predict_draws_one_png_per_readable_image_at_its_original_size(prediction):
    output, _ = prediction
    index = json.loads((output / "images.json").read_text())
    assert [entry["visualization"] for entry in index["images"]] == ["a_first.png", "nested/c_second.png"]
    assert sorted(path.relative_to(output).as_posix() for path in output.rglob("*.png")) == [
        "a_first.png",
        "nested/c_second.png",
    ]
    for entry in index["images"]:
        with Image.open(output / entry["visualization"]) as drawing:
            assert drawing.size == (entry["width"], entry["height"])


def test_unreadable_file_is_skipped_with_a_one_line_message(prediction):
    _, errors = prediction
    messages = [line for line in errors.splitlines() if line.startswith("skipping")]
    assert len(messages) == 1
    assert "b_broken.jpg: not a readable image" in messages[0]


def test_draw_detections_draws_only_boxes_at_or_above_threshold():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    detections = {
        "labels": torch.tensor([0, 1]),
        "boxes": torch.tensor([[20.0, 40.0, 80.0, 90.0], [120.0, 40.0, 180.0, 90.0]]),
        "scores": torch.tensor([0.5, 0.2]),
    }
    drawing = np.asarray(draw_detections(image, detections, ["kept", "dropped"], threshold=0.5))
    assert tuple(drawing[90, 50]) == PALETTE[0]  # bottom edge of the kept box
    assert not drawing[:, 100:].any()  # the right half, where the low-score box lies, stays black


def test_the_best_of_overlapping_detections_is_drawn_on_top_and_tags_stay_inside_the_image():
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    box = [-30.0, 60.0, 120.0, 190.0]  # starts left of the image: its tag must not lose its start
    detections = {
        "labels": torch.tensor([1, 0]),
        "boxes": torch.tensor([box, box]),
        "scores": torch.tensor([0.65, 0.32]),  # sorted by score, as the post-processor gives them
    }
    drawing = np.asarray(draw_detections(image, detections, ["weak", "strong"], threshold=0.3))
    assert tuple(drawing[120, 120]) == PALETTE[1]  # the right edge shows the best detection's colour
    tag_rows = drawing[60 - 20 : 60, :, :]
    assert (tag_rows[:, 0] == PALETTE[1]).all(axis=-1).any()  # the best tag starts at x = 0, inside the image


def test_tags_are_drawn_over_every_box():
    """A stronger box whose edge crosses a weaker box's tag must not erase part of its text ("baseba l glove")."""
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    weak_box, strong_box = [100.0, 100.0, 200.0, 150.0], [20.0, 20.0, 130.0, 190.0]  # the edge x = 130 crosses the tag
    weak = {"labels": torch.tensor([0]), "boxes": torch.tensor([weak_box]), "scores": torch.tensor([0.4])}
    both = {
        "labels": torch.tensor([0, 0]),
        "boxes": torch.tensor([strong_box, weak_box]),
        "scores": torch.tensor([0.9, 0.4]),
    }
    left, top, right, bottom = label_font(11).getbbox("a 0.40")
    tag_width, tag_height = right - left + 2 * TAG_PADDING, bottom - top + 2 * TAG_PADDING
    tag = (slice(100 - tag_height, 100), slice(100, 100 + tag_width))  # just above the weak box
    alone = np.asarray(draw_detections(image, weak, ["a"], threshold=0.3))
    crossed = np.asarray(draw_detections(image, both, ["a"], threshold=0.3))
    assert (alone[tag] != 0).any() and np.array_equal(crossed[tag], alone[tag])


def test_the_label_font_renders_every_character():
    font = label_font(14)
    assert font.getname()[0] == "DejaVu Sans"
    text = "baseball glove 0.83 rolled-in_scale défaut"
    for character in set(text) - {" "}:
        left, _, right, _ = font.getbbox(character)
        assert right > left, character
    assert font.getlength("baseball glove") > font.getlength("baseballglove")


def test_labels_lie_inside_the_image_and_never_overlap():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 2, 2, generator=generator) * torch.tensor([360.0, 260.0]) - 30  # some cross the edges
    boxes = torch.cat([corners.amin(1), corners.amax(1)], dim=1).tolist()
    sizes = [(int(width), 15) for width in torch.randint(30, 120, (60,), generator=generator)]
    spots = place_labels(boxes, sizes, (300, 200))
    placed = [spot for spot in spots if spot is not None]
    assert spots[0] is not None and 5 < len(placed) < 60  # the best box always has its label; in a crowd, not all
    for spot, (width, height) in zip(spots, sizes, strict=True):
        if spot is not None:
            left, top, right, bottom = spot
            assert (right - left, bottom - top) == (width, height)
            assert left >= 0 and top >= 0 and right <= 300 and bottom <= 200
    for index, first in enumerate(placed):
        for second in placed[index + 1 :]:
            assert first[2] <= second[0] or second[2] <= first[0] or first[3] <= second[1] or second[3] <= first[1]
    assert place_labels([[50, 100, 120, 150]], [(40, 15)], (300, 200)) == [(50, 85, 90, 100)]  # just above the box
    assert place_labels([[0, 0, 10, 10]], [(400, 15)], (300, 200)) == [None]  # wider than the image: no tag


def test_draw_nms_suppresses_duplicates_within_a_class_only():
    detections = {
        "labels": torch.tensor([0, 0, 1, 0]),
        "boxes": torch.tensor([[10.0, 10, 110, 110], [12, 10, 112, 110], [12, 10, 112, 110], [200, 10, 300, 110]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
    }
    assert shown_detections(detections, threshold=0.3) == [0, 1, 2, 3]
    assert shown_detections(detections, threshold=0.3, nms_iou=0.5) == [0, 2, 3]  # class 1 keeps its box
    assert shown_detections(detections, threshold=0.65, nms_iou=0.5) == [0, 2]


def test_visualization_names_keep_suffix_only_when_stems_collide():
    names = visualization_names([Path("x.jpg"), Path("y.jpg"), Path("y.png"), Path("d/z.bmp")])
    assert names == [Path("x.png"), Path("y.jpg.png"), Path("y.png.png"), Path("d/z.png")]


def test_cli_errors_are_one_line_with_exit_code_2(checkpoints, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.jpg").write_bytes(b"not a JPEG")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    runs = [
        (checkpoints["paths"]["phase0"], tmp_path / "empty", "no image files found"),
        (checkpoints["paths"]["phase0"], tmp_path / "missing", "no such file or folder"),
        (tmp_path / "bad.pth", tmp_path / "empty", "not a readable PyTorch checkpoint"),
        (checkpoints["paths"]["phase0"], tmp_path / "unreadable", "none of the 1 images could be read"),
    ]
    for checkpoint, images, message in runs:
        code = main(["--checkpoint", str(checkpoint), "--images", str(images), "--output", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2
        assert error.startswith("error: ") and message in error


def test_an_output_folder_that_cannot_be_a_folder_is_a_one_line_error(checkpoints, image_folder, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    never_read = tmp_path / "never_read.pth"  # the output is checked before the checkpoint is read
    arguments = [
        "--checkpoint",
        str(never_read),
        "--images",
        str(image_folder),
        "--output",
        str(tmp_path / "taken/out"),
    ]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output") and f"{tmp_path / 'taken'} is a file" in error and "\n" not in error
    # A drawing's subfolder (for images/nested/…) blocked by a file of that name in the output folder.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "nested").write_text("a file")
    arguments = ["--checkpoint", str(checkpoints["paths"]["phase0"]), "--images", str(image_folder)]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --output") and f"{tmp_path / 'out' / 'nested'} is a file" in error
    assert main([*arguments, "--output", str(tmp_path / "out2"), "--draw-nms", "1.5"]) == 2
    assert "--draw-nms is an IoU in [0, 1], got 1.5" in capsys.readouterr().err


def test_the_outputs_the_readme_examples_write_are_git_ignored():
    if shutil.which("git") is None or not (PROJECT_DIR / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = ["predictions/detections.json", "model.onnx", "exports/atto.onnx"]
    done = subprocess.run(["git", "check-ignore", *outputs], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.stdout.split() == outputs


def test_find_images_sorts_recursively_and_leaves_out_the_output_folder(tmp_path):
    for name in ("b.png", "a/c.JPG", "out/a_first.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path, exclude=tmp_path / "out") == [tmp_path / "a/c.JPG", tmp_path / "b.png"]
    assert find_images(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_readme_inference_lines_give_exactly_the_eval_only_metrics_of_the_real_detector(
    real_atto, datasets_dir, tmp_path, capsys
):
    """predict (with --ann) → evaluate on COCO ids with gaps gives every metric --eval-only computes, to the last bit
    (AP 0.2785; clipped boxes gave AP 0.278487 and AR100 0.4495 against 0.278472 and 0.4483).

    Both run batches of 40 images in the same order: another batch size changes the detector's outputs by float32
    noise (about 1e-4 in a logit), which can reorder near-tied detections."""
    images = datasets_dir / "coco-tiny" / "val2017"
    ann = datasets_dir / "coco-tiny" / "annotations" / "instances_val2017.json"
    output = tmp_path / "predictions"
    arguments = ["--checkpoint", str(real_atto), "--images", str(images), "--ann", str(ann), "--output", str(output)]
    assert main([*arguments, "--device", "cpu", "--batch-size", "40"]) == 0
    capsys.readouterr()
    assert evaluate_main(["--ann", str(ann), "--detections", str(output / "detections.json"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)

    inference = load_for_inference(real_atto)  # as train_progressive.py --eval-only evaluates (its val loader)
    dataset = CocoDetection(images, ann, build_val_transforms(inference.image_size, inference.normalize))
    loader = build_val_loader(dataset, batch_size=40, num_workers=0)
    cpu = torch.device("cpu")
    expected, _ = evaluate_detector(
        inference.model, inference.postprocessor, loader, cpu, dataset.category_ids, dataset.coco, progress=False
    )
    assert metrics == expected and metrics["AP"] == pytest.approx(0.2785, abs=5e-5)
    export = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(real_atto), "--output", str(export)]) == 0 and export.stat().st_size > 1e6


def test_ann_ids_are_looked_up_by_file_name_and_unlisted_images_are_skipped(
    checkpoints, image_folder, tmp_path, capsys
):
    ann = tmp_path / "val.json"
    images = [{"id": 5001, "file_name": "nested/c_second.jpg", "width": 250, "height": 330}]
    categories = [{"id": i, "name": name} for i, name in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)]
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    output = tmp_path / "out"
    arguments = ["--checkpoint", str(checkpoints["paths"]["phase2"]), "--images", str(image_folder), "--ann", str(ann)]
    assert main([*arguments, "--output", str(output)]) == 0
    assert "skipping 2 images that --ann" in capsys.readouterr().err
    detections = json.loads((output / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {5001} and {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
