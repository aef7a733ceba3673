"""The acceptance check of classes added by description, through the user's command on the real detector: a 68-class
official checkpoint, a validation file with 68 + 12 categories, text rows for all 80."""

import importlib.util
from pathlib import Path

import pytest
import torch

PROJECT_DIR = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("held_out_classes", PROJECT_DIR / "experiments" / "held_out_classes.py")
held_out_classes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(held_out_classes)


@pytest.fixture(scope="module")
def coco_setup(real_atto, coco_clip, datasets_dir):
    coco = datasets_dir / "coco-tiny"
    overrides = [  # evaluation only: the validation images stand in for the training ones
        *(f"data.{kind}_images={coco / 'val2017'}" for kind in ("train", "val")),
        *(f"data.{kind}_annotations={coco / 'annotations' / 'instances_val2017.json'}" for kind in ("train", "val")),
        f"text_encoder.precomputed={coco_clip}",
        "data.val_batch_size=40",
    ]
    return held_out_classes.Setup(None, overrides, real_atto, "cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory, coco_setup):
    rows = held_out_classes.class_texts(coco_setup.config(), tmp_path_factory.mktemp("cache"))
    held = held_out_classes.split_classes(0, num_classes=80, count=12)
    return held_out_classes.prepare_split(coco_setup, tmp_path_factory.mktemp("held_out"), held, rows)


def test_held_out_classes_scored_from_clip_text_beat_permuted_text_and_leave_the_known_classes_alone(coco_setup, split):
    oracle, clip, permuted = (
        held_out_classes.evaluate(coco_setup, split, variant) for variant in ("oracle", "text", "permuted")
    )
    assert set(clip["per_class"]) == set(split["names"])  # 80 classes from a 68-class checkpoint
    known = [held_out_classes.class_mean(metrics, split["known"]) for metrics in (oracle, clip, permuted)]
    assert all(abs(value - known[0]) <= 0.003 for value in known[1:])
    held = [held_out_classes.class_mean(metrics, split["held"]) for metrics in (clip, permuted)]
    assert held[0] > 0.01 and held[0] > held[1] + 0.01


def test_a_split_of_one_class_has_no_permuted_control_and_a_base_with_fusion_is_refused(tmp_path, coco_setup):
    rows = held_out_classes.class_texts(coco_setup.config(), tmp_path / "cache")
    split = held_out_classes.prepare_split(coco_setup, tmp_path / "one", [5], rows)
    assert split["held"] == ["bus"] and split["variants"] == ["oracle", "text", "random", "random_rows"]
    with pytest.raises(held_out_classes.HeldOutError, match="--count 79: with 80 classes hold out 1 to 78"):
        held_out_classes.run(coco_setup, tmp_path / "run", count=79, offsets=[0])
    with_fusion = tmp_path / "phase1.pth"
    state = torch.load(coco_setup.init)["model"]
    torch.save({"model": state, "fusion": {"w": torch.zeros(1)}, "phase": 1}, with_fusion)
    with pytest.raises(held_out_classes.HeldOutError, match="a phase-1 checkpoint with text fusion; the test needs"):
        held_out_classes.base_state(with_fusion, 80)


def test_the_figure_takes_the_controls_from_the_first_results_and_each_text_from_its_own(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_held_out", PROJECT_DIR / "experiments" / "plot_held_out.py")
    plot_held_out = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_held_out)

    def results(text_ap: float, with_permuted: bool) -> dict:
        names = ["oracle", "text", "random", "random_rows", *(["permuted"] if with_permuted else [])]
        variants = {name: {"held_out_AP": 0.1 * k, "known_AP": 0.3 + 0.001 * k} for k, name in enumerate(names)}
        variants["text"]["held_out_AP"] = text_ap
        return {"split_0": {"held_out": ["a"], "variants": variants}}

    splits, held, known = plot_held_out.bars({"CLIP": results(0.5, True), "MiniLM": results(0.7, False)})
    assert splits == ["split_0"]
    assert list(held) == ["own rows (oracle)", "CLIP", "MiniLM", "CLIP permuted", "random text", "random rows"]
    assert held["CLIP"] == [0.5] and held["MiniLM"] == [0.7] and held["CLIP permuted"] == [pytest.approx(0.4)]
    assert known["own rows (oracle)"] == [0.0] and known["random rows"] == [pytest.approx(0.003)]
    plot_held_out.plot({"CLIP": results(0.5, True)}, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 1000
