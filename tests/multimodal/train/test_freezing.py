"""Freezing: what a phase trains, frozen parts in eval mode through every train(), and the bit-identity proof."""

import pytest
import torch
import torch.nn.functional as F

from deim_lib import build_detector
from multimodal.model.detector import MultimodalDetector, attach_text
from multimodal.train.freezing import FrozenTensorChangedError, apply_phase, constant_parameters


def model_with_text() -> MultimodalDetector:
    torch.manual_seed(0)
    return attach_text(build_detector("atto", 3, eval_size=(160, 160)), F.normalize(torch.randn(3, 16), dim=-1))


def test_only_the_named_parts_train_and_constants_never_do():
    model = model_with_text()
    constants = constant_parameters(model)
    assert constants, "DEIMv2 builds some parameters non-trainable (up, reg_scale)"
    parts = model.parts()
    apply_phase(model, parts, ["fusion", "class_heads"], constants)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for name in ("fusion", "class_heads") for m in parts[name] for p in m.parameters()}
    assert trainable == expected - constants
    with pytest.raises(ValueError, match=r"unknown parts \['fusoin'\]"):
        apply_phase(model, parts, ["fusoin"], constants)


def test_frozen_parts_stay_in_eval_mode_and_a_changed_frozen_tensor_is_caught():
    model = model_with_text()
    policy = apply_phase(model, model.parts(), ["fusion"], constant_parameters(model))
    decoder = model.detector.decoder
    policy.set_train_mode(model, (decoder, decoder.decoder))
    assert model.fusion.training and not model.detector.backbone.training and not model.detector.encoder.training
    assert decoder.training and not decoder.dec_score_head.training  # the output switch only
    assert policy.verify_frozen(model) == len(policy.frozen_tensors) > 0
    with torch.no_grad():
        next(model.detector.backbone.parameters()).add_(1e-6)
    with pytest.raises(FrozenTensorChangedError, match="1 frozen tensors changed"):
        policy.verify_frozen(model)


def test_batchnorm_statistics_of_frozen_parts_do_not_move_in_a_training_forward():
    model = model_with_text()
    policy = apply_phase(model, model.parts(), ["fusion"], constant_parameters(model))
    decoder = model.detector.decoder
    policy.set_train_mode(model, (decoder, decoder.decoder))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    model(torch.rand(1, 3, 160, 160), targets)
    assert policy.verify_frozen(model) > 0
