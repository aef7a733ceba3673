"""torch.compile of the frozen backbone and encoder: same losses and gradients as the plain path, same keys."""

import copy

import torch
import torch.nn.functional as F

from deim_lib import build_criterion, build_detector
from multimodal.model.detector import attach_text
from multimodal.train.freezing import apply_phase, compile_frozen_parts, constant_parameters

IMAGE_SIZE = 160
NUM_CLASSES = 5


def phase1_model() -> torch.nn.Module:
    """An atto text-fusion model frozen for phase 1, with an open fusion so that it shapes every output."""
    torch.manual_seed(0)
    detector = build_detector("atto", NUM_CLASSES, eval_size=(IMAGE_SIZE, IMAGE_SIZE))
    model = attach_text(detector, F.normalize(torch.randn(NUM_CLASSES, 32), dim=-1))
    with torch.no_grad():
        for level in model.fusion.levels:
            level.output.weight.normal_(0.0, 0.5)
    policy = apply_phase(model, model.parts(), ["fusion"], constant_parameters(model))
    policy.set_train_mode(model, (detector.decoder, detector.decoder.decoder))
    return model


def batch(batch_size: int = 2) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    targets = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (3,), generator=generator),
            "boxes": torch.cat([0.3 + 0.4 * torch.rand(3, 2, generator=generator), torch.full((3, 2), 0.2)], dim=1),
        }
        for _ in range(batch_size)
    ]
    return images, targets


def losses_and_fusion_grads(model, images, targets) -> tuple[dict, dict]:
    torch.manual_seed(7)  # the denoising queries are drawn at random
    losses = build_criterion("atto", NUM_CLASSES)(model(images, targets), targets)
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_compiled_frozen_parts_give_the_plain_losses_and_gradients():
    model = phase1_model()
    plain = copy.deepcopy(model)  # copied before compiling: runs eagerly
    assert compile_frozen_parts(model.parts()) == ["backbone", "encoder"]
    assert list(model.state_dict()) == list(plain.state_dict())

    images, targets = batch()
    compiled_losses, compiled_grads = losses_and_fusion_grads(model, images, targets)
    plain_losses, plain_grads = losses_and_fusion_grads(plain, images, targets)
    assert compiled_losses.keys() == plain_losses.keys() and len(plain_losses) > 10
    for name, value in plain_losses.items():
        torch.testing.assert_close(compiled_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Compiling a deep copy (the EMA's) reuses the compiled code, which must read the copy's own weights.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.detector.backbone.stem.stem1.conv.weight.mul_(0.5)
    eager = copy.deepcopy(other)
    compile_frozen_parts(other.parts())
    with torch.no_grad():
        got, want = other.detector.backbone(images), eager.detector.backbone(images)
        unchanged = model.detector.backbone(images)
    for level, (g, w, u) in enumerate(zip(got, want, unchanged, strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"level {level}")
        assert not torch.allclose(g, u), level


def test_only_parts_without_trainable_parameters_are_compiled():
    model = phase1_model()
    model.detector.encoder.requires_grad_(True)
    assert compile_frozen_parts(model.parts()) == ["backbone"]
