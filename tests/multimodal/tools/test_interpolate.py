"""WiSE-FT interpolation: weight 0 is exactly the base, weight 1 exactly the fine-tuned model, the curve and the
saved mix (a phase checkpoint that official tools read)."""

import json

import matplotlib.pyplot as plt
import pytest
import torch

import train_progressive
from deim_lib import build_detector, load_official_checkpoint
from multimodal.tools.interpolate import choose_weight, curve_figure, main, mix_states
from multimodal.tools.predict import load_for_inference
from tests.test_train_progressive import IMAGE_SIZE, official_checkpoint, write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, text_cache) -> dict:
    """A base detector and a phase-1 fine-tune of it (fusion open, detector unchanged) plus a phase-3 one."""
    folder = tmp_path_factory.mktemp("wise")
    base = official_checkpoint(folder / "base.pth")
    config = write_config(folder, tiny_data, text_cache, phase3={"epochs": 2})
    out = folder / "out"
    for arguments in (["--phase", "1", "--init", base], ["--phase", "2"], ["--phase", "3"]):
        assert train_progressive.main([str(a) for a in ["--config", config, "--output-dir", out, *arguments]]) == 0
    return {"base": base, "config": config, "out": out, "folder": folder}


def outputs(path, images: torch.Tensor) -> dict:
    model = load_for_inference(path).model
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("end", [0.0, 1.0])
def test_the_ends_of_the_line_are_exactly_the_base_and_the_fine_tuned_model(runs, end, capsys):
    tuned = runs["out"] / "phase3_best.pth"
    output = runs["folder"] / f"mix_{end:g}"
    arguments = ["--base", runs["base"], "--finetuned", tuned, "--weights", "0", "0.5", "1", "--choose", str(end)]
    assert main([str(a) for a in [*arguments, "--output", output]]) == 0
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    mixed = outputs(output / "wise_ft.pth", images)
    expected = outputs(tuned if end else runs["base"], images)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(mixed[key], expected[key]), key

    curve = json.loads((output / "curve.json").read_text())
    assert [point["weight"] for point in curve["points"]] == [0.0, 0.5, 1.0] and curve["chosen"] == end
    baseline = json.loads((runs["out"] / "baseline.json").read_text())
    assert curve["points"][0]["AP"] == pytest.approx(baseline["AP"], abs=1e-9)
    best = torch.load(tuned, weights_only=True)["best_metric"]
    assert curve["points"][-1]["AP"] == pytest.approx(best, abs=1e-9)
    assert (output / "curve.png").stat().st_size > 1000
    # The saved mix is also an official-format checkpoint: its detector loads strictly into a plain DEIMv2.
    detector = build_detector("atto", 5, eval_size=(IMAGE_SIZE, IMAGE_SIZE))
    detector.load_state_dict(load_official_checkpoint(output / "wise_ft.pth"), strict=True)


def test_a_mix_lies_between_the_ends_and_integer_buffers_come_from_the_nearer_end():
    base = {"w": torch.zeros(3), "n": torch.tensor(1)}
    tuned = {"w": torch.full((3,), 2.0), "n": torch.tensor(9)}
    assert torch.equal(mix_states(base, tuned, 0.25)["w"], torch.full((3,), 0.5))
    assert mix_states(base, tuned, 0.25)["n"] == 1 and mix_states(base, tuned, 0.75)["n"] == 9


def test_bad_weights_and_mismatched_detectors_are_one_line_errors(runs, tmp_path, capsys):
    tuned = runs["out"] / "phase1_best.pth"
    common = ["--finetuned", str(tuned), "--output", str(tmp_path / "out")]
    assert main(["--base", str(runs["base"]), *common, "--weights", "0", "1.5"]) == 2
    assert "lie in [0, 1]" in capsys.readouterr().err
    other = official_checkpoint(tmp_path / "c3.pth", num_classes=3)
    assert main(["--base", str(other), *common]) == 2
    assert "hold different detectors" in capsys.readouterr().err


def test_a_chosen_weight_outside_weights_is_evaluated_and_said_so(runs, capsys):
    output = runs["folder"] / "mix_chosen"
    arguments = ["--base", runs["base"], "--finetuned", runs["out"] / "phase1_best.pth", "--weights", "0", "1"]
    assert main([str(a) for a in [*arguments, "--choose", "0.3", "--output", output]]) == 0
    out = capsys.readouterr().out
    assert "--choose 0.3 is not among --weights: evaluating it as well" in out
    assert "saved weight 0.3, as --choose asks" in out
    curve = json.loads((output / "curve.json").read_text())
    assert [point["weight"] for point in curve["points"]] == [0.0, 1.0, 0.3] and curve["chosen"] == 0.3
    assert torch.load(output / "wise_ft.pth", weights_only=True)["best_metric"] == curve["points"][2]["AP"]


def test_the_best_weight_wins_and_of_tied_weights_the_one_nearest_the_base():
    def points(*aps):
        return [{"weight": weight, "AP": ap} for weight, ap in zip((1.0, 0.5, 0.0), aps, strict=True)]

    assert choose_weight(points(0.3, 0.4, 0.2), None) == (0.5, "weight 0.5, the best AP 0.4000")
    assert choose_weight(points(0.4, 0.4, 0.2), None) == (
        0.5,
        "weight 0.5, the nearest the base: weights 0.5, 1 tie for the best AP 0.4000",
    )
    assert choose_weight(points(0.4, 0.4, 0.4), None) == (0.0, "the base (weight 0): all 3 weights tie at AP 0.4000")
    assert choose_weight(points(0.4, 0.4, 0.4), 1.0) == (1.0, "weight 1, as --choose asks")


def test_the_curve_marks_the_saved_weight():
    points = [{"weight": weight, "AP": ap, "AP50": ap + 0.2} for weight, ap in ((0.0, 0.30), (1.0, 0.32), (0.3, 0.31))]
    figure = curve_figure(points, chosen=0.3)
    axis = figure.axes[0]
    (marker,) = [line for line in axis.get_lines() if line.get_label() == "saved: 0.3"]
    assert list(marker.get_xdata()) == [0.3] and list(marker.get_ydata()) == [0.31]
    assert "saved: 0.3" in [text.get_text() for text in axis.get_legend().get_texts()]
    plt.close(figure)


def test_an_output_folder_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    never_read = str(tmp_path / "never_read.pth")  # the output is checked before the checkpoints are read
    arguments = ["--base", never_read, "--finetuned", never_read, "--output", str(tmp_path / "taken" / "out")]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --output") and f"{tmp_path / 'taken'} is a file" in error and "\n" not in error
