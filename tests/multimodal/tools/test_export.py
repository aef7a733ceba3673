"""ONNX export: the official graph interface, text embeddings baked in, onnxruntime equal to PyTorch eval + post."""

import json

import onnx
import onnxruntime
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from multimodal.tools.export import export_onnx, main
from multimodal.tools.predict import load_for_inference
from tests.multimodal.tools.test_predict import ATTO_CHECKPOINT, CLASS_NAMES, write_training_checkpoint


@pytest.fixture(scope="module")
def reference(reference_dir) -> dict:
    """Two reference images (already at 320×320, [0, 1]), their original sizes and the official detections."""
    return torch.load(reference_dir / "deimv2_atto_c6_io.pt", weights_only=True)


def run_onnx(path, images: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, boxes, scores = session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    return [
        {"labels": torch.from_numpy(label), "boxes": torch.from_numpy(box), "scores": torch.from_numpy(score)}
        for label, box, score in zip(labels, boxes, scores, strict=True)
    ]


def assert_same_detections(ours: dict, expected: dict, score_tol: float = 1e-4, box_tol: float = 1e-3) -> None:
    """Equal up to the order of near-tied scores: a one-to-one matching with equal labels and scores/boxes within
    tolerance (neighbouring scores can be closer than float32 noise, so index-wise order may legitimately swap)."""
    assert ours["labels"].dtype == torch.int64 and ours["boxes"].dtype == ours["scores"].dtype == torch.float32
    assert ours["scores"].shape == expected["scores"].shape == (300,)
    assert torch.allclose(ours["scores"], expected["scores"], atol=score_tol)  # both sorted descending
    fits = (
        (ours["labels"][:, None] == expected["labels"][None])
        & ((ours["scores"][:, None] - expected["scores"][None]).abs() <= score_tol)
        & ((ours["boxes"][:, None] - expected["boxes"][None]).abs().amax(-1) <= box_tol)
    )
    rows, columns = linear_sum_assignment(~fits.numpy())
    assert fits[rows, columns].all(), f"{int((~fits[rows, columns]).sum())} detections have no counterpart"


def test_multimodal_export_bakes_text_in_and_matches_pytorch_on_a_batch_of_two(tmp_path, reference):
    checkpoint = tmp_path / "phase2_best.pth"
    write_training_checkpoint(checkpoint, phase=2)
    inference = load_for_inference(checkpoint)
    images, sizes = reference["pixel_values"], reference["orig_target_sizes"]
    with torch.no_grad():
        expected = inference.postprocessor(inference.model(images), sizes)

    exported = export_onnx(inference, tmp_path / "model.onnx")  # traced at batch 1: the batch axis must be dynamic
    assert [graph_input.name for graph_input in exported.graph.input] == ["images", "orig_target_sizes"]
    assert [graph_output.name for graph_output in exported.graph.output] == ["labels", "boxes", "scores"]

    ours = run_onnx(tmp_path / "model.onnx", images, sizes)
    for image, (result, wanted) in enumerate(zip(ours, expected, strict=True)):
        assert_same_detections(result, wanted)
        # The fusion is far from identity: the plain detector's detections differ, so the text constants matter.
        plain = reference["postprocessed"][image]["scores"]
        assert (result["scores"] - plain).abs().max() > 1e-2


def test_official_checkpoint_export_cli_matches_official_detections(tmp_path, reference, capsys):
    output = tmp_path / "onnx" / "atto.onnx"
    arguments = ["--checkpoint", str(ATTO_CHECKPOINT), "--output", str(output), "--class-names", ",".join(CLASS_NAMES)]
    assert main(arguments) == 0
    assert "atto, 6 classes, input 320" in capsys.readouterr().out
    exported = onnx.load(str(output))
    onnx.checker.check_model(exported, full_check=True)
    assert [graph_input.name for graph_input in exported.graph.input] == ["images", "orig_target_sizes"]
    shapes = {
        graph_output.name: [axis.dim_param or axis.dim_value for axis in graph_output.type.tensor_type.shape.dim]
        for graph_output in exported.graph.output
    }
    assert shapes == {"labels": ["N", 300], "boxes": ["N", 300, 4], "scores": ["N", 300]}  # only N is dynamic
    metadata = {entry.key: json.loads(entry.value) for entry in exported.metadata_props}
    assert metadata == {"variant": "atto", "class_names": CLASS_NAMES, "image_size": 320, "normalize": None}

    ours = run_onnx(output, reference["pixel_values"], reference["orig_target_sizes"])
    for result, wanted in zip(ours, reference["postprocessed"], strict=True):
        assert_same_detections(result, wanted)


def test_export_cli_reports_a_bad_checkpoint_or_opset_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(tmp_path / "bad.pth"), "--output", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "bad.pth" in error and "\n" not in error
    assert not (tmp_path / "m.onnx").exists()
    assert main(["--checkpoint", str(tmp_path / "bad.pth"), "--output", str(tmp_path / "m.onnx"), "--opset", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --opset 5: choose 16–20 (the decoder needs grid_sample, opset 16; the exporter goes up to 20)"
    )


def test_export_cli_reports_an_output_that_cannot_be_written_in_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    never_read = str(tmp_path / "never_read.pth")  # the output is checked before the checkpoint is read
    assert main(["--checkpoint", never_read, "--output", str(tmp_path / "taken" / "model.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output") and f"{tmp_path / 'taken'} is a file" in error and "\n" not in error
    assert main(["--checkpoint", never_read, "--output", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --output {tmp_path}: is a folder; pass the path of the .onnx file to write"
    )
