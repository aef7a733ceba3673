"""Loading official checkpoints: one-line errors for bad files, variant and class-count mismatches."""

import pytest
import torch

from deim_lib import CheckpointError, build_detector, load_detector_state, load_official_checkpoint
from deim_lib.checkpoint import detector_state_dict


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint(tmp_path / "nope.pth")


def test_truncated_file_is_a_clear_error(tmp_path, reference_dir):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((reference_dir / "deimv2_atto_c6.pth").read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        load_official_checkpoint(truncated)
    assert "\n" not in str(error.value)


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a DEIMv2 checkpoint"):
        load_official_checkpoint(foreign)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_and_bare_state_dicts_are_read_and_said(tmp_path, prefix):
    state = build_detector("atto", 3).state_dict()
    prefixed = {f"{prefix}{key}": value for key, value in state.items()}
    loaded, where = detector_state_dict({"model": prefixed}, "x.pth")
    assert list(loaded) == list(state) and where == f"'model', {prefix!r} prefix removed"
    loaded, where = detector_state_dict(state, "x.pth")
    assert loaded is state and where == "a bare state dict"
    with pytest.raises(CheckpointError, match=r"x\.pth: the state dict in 'model' has no 'decoder\.\*' keys"):
        detector_state_dict({"model": {"conv.weight": torch.zeros(1)}}, "x.pth")


def test_variant_mismatch_names_the_variant_the_keys_look_like(reference_dir):
    state_dict = load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth")
    model = build_detector("femto", 6)
    with pytest.raises(CheckpointError, match="look like variant 'atto'"):
        load_detector_state(model, state_dict, "deimv2_atto_c6.pth")


def test_class_count_mismatch_names_both_counts_and_the_fix(reference_dir):
    state_dict = load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth")
    with pytest.raises(CheckpointError, match=r"6 classes, the model 4.*reinit_class_heads"):
        load_detector_state(build_detector("atto", 4), state_dict, "deimv2_atto_c6.pth")


def test_reinitialising_class_heads_reports_exactly_the_reset_tensors(reference_dir):
    state_dict = load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth")
    model = build_detector("atto", 4)
    reset = load_detector_state(model, state_dict, "deimv2_atto_c6.pth", reinit_class_heads=True)
    assert reset == sorted(
        ["decoder.denoising_class_embed.weight", "decoder.enc_score_head.weight", "decoder.enc_score_head.bias"]
        + [f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    )
    loaded = model.state_dict()
    for key, value in state_dict.items():
        if key not in reset:
            assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
