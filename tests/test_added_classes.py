"""Classes added by description, through every entry point: a 3-class official checkpoint and a 5-class dataset with
``model.new_classes: text`` train phase 1 and phase 2, resume, predict, export and interpolate."""

import json

import pytest
import torch

import train_progressive
from multimodal.model.assemble import TEXT_SCORE_KEY
from multimodal.tools import export, interpolate, predict
from multimodal.train.checkpoint import read_phase_checkpoint
from tests.test_train_progressive import official_checkpoint, run, write_config

NEW = ["--set", "model.new_classes=text"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, text_cache):
    """Phase 1 then phase 2 from a 3-class official file on the 5-class generated data (one epoch each)."""
    directory = tmp_path_factory.mktemp("added")
    base = official_checkpoint(directory / "base3.pth", num_classes=3)
    config = write_config(directory, tiny_data, text_cache)
    output = directory / "run"
    for phase in ("1", "2"):
        args = ["--config", config, "--phase", phase, "--output-dir", output, *NEW]
        args += ["--init", base] if phase == "1" else []
        assert train_progressive.main([str(arg) for arg in args]) == 0
    return {"base": base, "config": config, "output": output, "data": tiny_data}


def test_the_phases_add_the_classes_and_phase_two_trains_the_shared_map(trained):
    best1, best2 = (read_phase_checkpoint(trained["output"] / f"phase{i}_best.pth") for i in (1, 2))
    assert len(best2.info.class_names) == 5 and best1.info.class_names == best2.info.class_names
    (weights1, _), (weights2, _) = best1.weights(), best2.weights()
    maps = [key for key in weights2 if "text_map" in key]
    assert TEXT_SCORE_KEY in weights1 and maps
    assert not any("score_head.weight" in key for key in weights2)  # no free row per class is left
    assert any(not torch.equal(weights1[key], weights2[key]) for key in maps)


def test_a_resumed_phase_with_added_classes_continues(trained, capsys):
    last = trained["output"] / "phase2_last.pth"
    code, _, errors = run(capsys, "--resume", last, "--set", "phase2.epochs=2")
    assert code == 0 and not [line for line in errors if line.startswith("error")]
    resumed = read_phase_checkpoint(last)
    assert resumed.progress.state.epoch == 2 and len(resumed.info.class_names) == 5


def test_predict_and_export_read_the_added_classes(trained, tmp_path):
    best = trained["output"] / "phase2_best.pth"
    inference = predict.load_for_inference(best)
    assert len(inference.class_names) == 5 and inference.model.scores_from_text
    images = trained["data"]["val_images"]
    assert predict.main(["--checkpoint", str(best), "--images", str(images), "--output", str(tmp_path / "p")]) == 0
    detections = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= set(read_phase_checkpoint(best).info.category_ids)
    assert export.main(["--checkpoint", str(best), "--output", str(tmp_path / "model.onnx")]) == 0


def test_interpolating_from_the_3_class_base_starts_at_the_base_with_added_classes(trained, tmp_path, capsys):
    best = trained["output"] / "phase2_best.pth"
    record = interpolate.interpolate(str(trained["base"]), str(best), [0.0, 1.0], tmp_path, str(trained["config"]))
    code, out, _ = run(
        capsys, "--config", trained["config"], "--phase", "2", "--init", trained["base"], "--eval-only", *NEW
    )
    base = json.loads(next(line for line in out.splitlines() if line.startswith("metrics: ")).removeprefix("metrics: "))
    assert code == 0 and record["points"][0]["AP"] == pytest.approx(base["AP"], abs=1e-9)
