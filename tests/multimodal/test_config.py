"""The typed config: phase-table defaults, strict keys and ranges, YAML round trip, what a resume may change."""

import json

import pytest
import yaml

from multimodal.config import (
    ConfigError,
    TrainConfig,
    changed_values,
    config_from_values,
    config_to_dict,
    config_to_yaml,
    load_config,
    resume_differences,
)
from multimodal.phase_table import PHASES
from tests.conftest import PROJECT_DIR

DATA = [f"data.{key}=x" for key in ("train_images", "train_annotations", "val_images", "val_annotations")]


def test_phase_defaults_come_from_the_phase_table():
    config = TrainConfig()
    for rule in PHASES:
        phase = config.phase(rule.index)
        assert (tuple(phase.trainable), phase.lr, phase.weight_decay) == (rule.trainable, rule.lr, rule.weight_decay)
        assert (phase.augmentation, phase.epochs) == (rule.augmentation, rule.epochs)


def test_printed_yaml_loads_back_to_the_same_config(tmp_path):
    config = load_config(None, [*DATA, "phase1.epochs=3", "phase2.trainable=[fusion, class_heads, box_heads]"])
    path = tmp_path / "printed.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config
    assert config_from_values(config_to_dict(config)) == config
    assert "phase1.epochs=3" in changed_values(config) and "phase3" not in changed_values(config)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("phase1.lr=-1", "phase1.lr: -1.0 must be at least 0"),
        ("phase1.ema_decay=1.0", "strictly between 0 and 1"),
        ("phase2.flat_fraction=2", "phase2.flat_fraction: 2.0 must lie in [0, 1]"),
        ("monitor.text_reliance=sometimes", "monitor.text_reliance: 'sometimes' is not one of"),
        ("text_encoder.backend=tf", "text_encoder.backend: 'tf' is not one of 'open_clip', 'huggingface'"),
        ("phase0.trainable=[fusion]", "phase 0 trains the detector without text"),
        ("model.image_size=100", "multiple of 32"),
        ("phase1.trainable=fusion", "phase1.trainable: expected a list such as [a, b]"),
        ("phase1.lr=[", "--set 'phase1.lr=[': the value is not valid YAML"),
    ],
)
def test_out_of_range_values_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [*DATA, assignment])


def test_a_resume_may_change_what_steers_the_run_but_not_what_it_trains():
    saved = load_config(None, DATA)
    steering = load_config(
        None,
        [
            *DATA,
            "phase1.epochs=30",
            "monitor.max_nonfinite_steps=50",
            "data.num_workers=0",
            "compile_frozen=true",
            "phase2.lr=0.1",
            "text_encoder.cache_dir=/tmp/x",
        ],
    )
    conflicts, changes = resume_differences(saved, steering, phase=1)
    assert conflicts == [] and len(changes) == 6
    assert any(line.startswith("phase1.epochs: 12 → 30 (the LR schedule of phase 1 now spans 30") for line in changes)
    changed = load_config(None, [*DATA, "phase1.lr=0.001", "data.batch_size=2", "data.classes={a: [b]}"])
    conflicts, _ = resume_differences(saved, changed, phase=1)
    assert [c.split(":")[0] for c in conflicts] == ["data.batch_size", "data.classes", "phase1.lr"]
    assert "phase2.lr" in resume_differences(saved, steering, phase=2)[0][0]


def test_a_base_config_takes_only_the_keys_the_yaml_and_the_sets_give(tmp_path):
    base = load_config(None, [*DATA, "phase2.epochs=1", "phase2.lr=0.001"])
    path = tmp_path / "c.yaml"
    path.write_text("monitor: {max_ap_drop: 0.2}\n")
    config = load_config(path, ["phase2.checkpoint_every_steps=5"], base=base)
    assert (config.phase2.epochs, config.phase2.lr, config.phase2.checkpoint_every_steps) == (1, 0.001, 5)
    assert config.monitor.max_ap_drop == 0.2 and config.data == base.data


def test_a_misspelt_set_key_is_reported_against_the_set_not_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": dict(item.split("=") for item in (d.removeprefix("data.") for d in DATA))}))
    with pytest.raises(ConfigError, match=r"^--set data\.batchsize=2: unknown key 'data\.batchsize'; did you mean"):
        load_config(path, ["data.batchsize=2"])
    with pytest.raises(ConfigError, match=r"^--set model\.variant=atom: model\.variant: 'atom' is not one of"):
        load_config(path, ["model.variant=atom"])
    path.write_text(path.read_text() + "phase1: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'phase1\.epoch'; did you mean 'phase1\.epochs'"):
        load_config(path, ["data.batch_size=2"])


def test_the_image_size_resolves_to_the_variants_input_size():
    assert load_config(None, DATA).model.image_size == 320
    assert load_config(None, [*DATA, "model.variant=s"]).model.image_size == 640
    assert load_config(None, [*DATA, "model.image_size=192"]).model.image_size == 192
    assert "image_size: 320" in config_to_yaml(load_config(None, DATA))


def test_yaml_numbers_in_any_spelling_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"phase1": {"lr": "2e-4"}}) + "data: {train_images: a, train_annotations: b, "
        "val_images: c, val_annotations: d}\n"
    )
    assert load_config(path).phase1.lr == 2e-4


@pytest.mark.parametrize("path", sorted((PROJECT_DIR / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_phase_reaches_its_lr_after_warm_up(path):
    config = load_config(path)
    if config.data.synthetic_dir:
        images = config.data.synthetic_images[0]
    else:
        annotations = PROJECT_DIR / config.data.train_annotations
        if not annotations.is_file():
            pytest.skip(f"{annotations} is not here (../shared, or a file the config's comment says how to make)")
        images = len(json.loads(annotations.read_text())["images"])
    steps_per_epoch = images // config.data.batch_size
    for rule in PHASES:
        phase = config.phase(rule.index)
        assert phase.warmup_iters < phase.epochs * steps_per_epoch, f"{path.name}: phase{rule.index}"


def test_class_scores_follow_new_classes_unless_set_and_conflicts_are_named():
    assert load_config(None, DATA).model.class_scores == "linear"
    assert load_config(None, [*DATA, "model.new_classes=text"]).model.class_scores == "text"
    rows = load_config(None, [*DATA, "model.new_classes=text", "model.class_scores=linear"])
    assert rows.model.class_scores == "linear"  # text-initialised free rows
    with pytest.raises(ConfigError, match=r"model\.new_classes: 'words' is not one of"):
        load_config(None, [*DATA, "model.new_classes=words"])
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, [*DATA, "model.new_classes=random", "model.reinit_class_heads=true"])
