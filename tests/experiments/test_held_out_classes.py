"""The acceptance check of classes added by description, through the user's command on the real detector: a 68-class
official checkpoint, a validation file with 68 + 12 categories, text rows for all 80."""

import importlib.util
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("held_out_classes", PROJECT_DIR / "experiments" / "held_out_classes.py")
held_out_classes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(held_out_classes)


@pytest.fixture(scope="module")
def split(tmp_path_factory, real_atto, coco_clip, datasets_dir):
    rows = held_out_classes.text_rows("clip", tmp_path_factory.mktemp("cache"))
    return held_out_classes.prepare_split(tmp_path_factory.mktemp("held_out"), held_out_classes.split_classes(0), rows)


def test_held_out_classes_scored_from_clip_text_beat_permuted_text_and_leave_the_known_classes_alone(split):
    oracle, clip, permuted = (held_out_classes.evaluate(split, variant) for variant in ("oracle", "text", "permuted"))
    assert set(clip["per_class"]) == set(split["names"])  # 80 classes from a 68-class checkpoint
    known = [held_out_classes.class_mean(metrics, split["known"]) for metrics in (oracle, clip, permuted)]
    assert all(abs(value - known[0]) <= 0.003 for value in known[1:])
    held = [held_out_classes.class_mean(metrics, split["held"]) for metrics in (clip, permuted)]
    assert held[0] > 0.01 and held[0] > held[1] + 0.01
