"""The demo's generated dataset follows the config: generated when missing, again when the config asks for another."""

import json

from multimodal.config import DataConfig
from multimodal.data.loaders import data_paths, prepare_synthetic_data


def test_the_synthetic_dataset_is_regenerated_when_the_config_asks_for_another(tmp_path):
    data = DataConfig(synthetic_dir=str(tmp_path / "synthetic"), synthetic_images=[3, 2])
    assert prepare_synthetic_data(data)
    assert not prepare_synthetic_data(data)  # the same counts and seed: kept
    more = DataConfig(synthetic_dir=data.synthetic_dir, synthetic_images=[4, 2])
    assert prepare_synthetic_data(more)
    train = json.loads(data_paths(more)["train_annotations"].read_text())
    assert len(train["images"]) == 4 and len(list(data_paths(more)["train_images"].iterdir())) == 4
    assert prepare_synthetic_data(
        DataConfig(synthetic_dir=data.synthetic_dir, synthetic_images=[4, 2], synthetic_seed=1)
    )


def test_regenerating_the_synthetic_dataset_keeps_other_files_in_its_folder(tmp_path):
    data = DataConfig(synthetic_dir=str(tmp_path), synthetic_images=[2, 1])
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_synthetic_data(data)
    assert prepare_synthetic_data(DataConfig(synthetic_dir=str(tmp_path), synthetic_images=[3, 1]))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert len(list(data_paths(data)["train_images"].iterdir())) == 3
