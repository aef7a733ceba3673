"""Detector construction: parameter counts of every variant equal the official ones, train and deploy layouts."""

import pytest
import torch

from deim_lib import build_detector
from deim_lib.variants import VARIANTS

# (train-mode unique parameters, deploy parameters, state_dict entries) of the official models with 80 classes.
OFFICIAL_COUNTS = {
    "s": (9_779_838, 9_707_403, 673),
    "m": (18_357_750, 18_106_355, 769),
    "l": (32_551_214, 32_178_043, 809),
    "x": (51_211_736, 50_260_163, 989),
    "atto": (508_985, 494_159, 493),
    "femto": (983_945, 962_311, 493),
    "pico": (1_539_539, 1_514_285, 551),
    "n": (3_600_421, 3_571_527, 639),
    "hgnetv2_s": (10_451_413, 10_367_027, 729),
    "hgnetv2_m": (18_866_352, 18_525_501, 943),
    "hgnetv2_l": (31_090_936, 30_572_003, 1137),
    "hgnetv2_x": (60_291_704, 59_273_315, 1325),
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_official_train_and_deploy_counts(variant):
    train_params, deploy_params, state_dict_entries = OFFICIAL_COUNTS[variant]
    model = build_detector(variant, 80)
    assert count_parameters(model) == train_params
    assert len(model.state_dict()) == state_dict_entries
    model.deploy()
    assert count_parameters(model) == deploy_params


def test_trainable_parameters_exclude_only_the_official_constants():
    with torch.device("meta"):
        model = build_detector("hgnetv2_x", 80)
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert "decoder.up" in frozen and "decoder.reg_scale" in frozen
    assert sum(model.get_parameter(name).numel() for name in frozen) == 60_291_704 - 60_266_262


def test_atto_eval_forward_shapes():
    model = build_detector("atto", 3).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 320, 320))
    assert outputs["pred_logits"].shape == (2, 100, 3)
    assert outputs["pred_boxes"].shape == (2, 100, 4)
    assert torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_boxes"]).all()


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="atto, femto, pico"):
        build_detector("tiny", 80)
