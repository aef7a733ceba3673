"""MultimodalFusionModule and TextAwareClassifier: exact identity at init, a first step that moves whole matrices,
centred values (class-independent text adds nothing), permutation behaviour, analytic cost."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from multimodal.model.fusion import MultimodalFusionModule, TextAwareClassifier, fusion_cost

CHANNELS = (32, 32)
TEXT_DIM = 24
NUM_CLASSES = 5


def make_inputs(batch: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, c, s, s + 1, generator=generator) for c, s in zip(CHANNELS, (8, 4), strict=True)]
    return feats, F.normalize(torch.randn(NUM_CLASSES, TEXT_DIM, generator=generator), dim=-1)


def opened(fusion: MultimodalFusionModule) -> MultimodalFusionModule:
    """The fusion with its output projections moved off zero, as training does."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for level in fusion.levels:
            level.output.weight.copy_(torch.randn(level.output.weight.shape, generator=generator))
    return fusion


def test_fusion_output_equals_input_bit_exactly_at_init():
    torch.manual_seed(0)
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs()
    out = fusion(feats, text)
    assert [o.shape for o in out] == [f.shape for f in feats]
    assert all(torch.equal(o, f) for o, f in zip(out, feats, strict=True))


def test_first_adamw_step_moves_every_output_weight_by_about_lr_and_then_every_parameter_learns():
    torch.manual_seed(0)
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs()
    targets = [torch.randn_like(f) for f in feats]

    def backward() -> None:
        fusion.zero_grad(set_to_none=False)
        loss = sum((o * t).sum() for o, t in zip(fusion(feats, text), targets, strict=True))
        loss.backward()

    backward()
    for name, param in fusion.named_parameters():
        if name.endswith("output.weight"):
            assert torch.count_nonzero(param.grad) == param.numel(), name  # the whole matrix gets a gradient
        else:
            assert torch.count_nonzero(param.grad) == 0, name  # behind the zero output: nothing flows yet
    lr = 1e-3
    torch.optim.AdamW(fusion.parameters(), lr=lr, weight_decay=0.0).step()
    for level in fusion.levels:
        # AdamW's first step is about lr · sign(grad) per entry: the whole C×C matrix moves, not one scalar gate.
        moved = level.output.weight.abs()
        assert (moved > 0.5 * lr).all() and (moved <= lr * (1 + 1e-5)).all()
    backward()
    for name, param in fusion.named_parameters():
        assert param.grad.abs().sum() > 0, name
    assert not any(torch.equal(o, f) for o, f in zip(fusion(feats, text), feats, strict=True))


def test_text_that_is_the_same_for_every_class_adds_nothing():
    torch.manual_seed(0)
    fusion = opened(MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4))
    feats, text = make_inputs()
    same = text[:1].expand(NUM_CLASSES, -1)
    for out, feat in zip(fusion(feats, same), feats, strict=True):
        torch.testing.assert_close(out, feat, rtol=0, atol=1e-6)
    assert not all(torch.allclose(o, f) for o, f in zip(fusion(feats, text), feats, strict=True))


def test_fusion_is_invariant_to_the_order_of_the_classes_and_the_classifier_follows_it():
    """Cross-attention reads the class tokens as a set: the classifier is where a class meets its own description."""
    torch.manual_seed(0)
    fusion = opened(MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4))
    feats, text = make_inputs()
    order = torch.tensor([2, 0, 4, 1, 3])
    for a, b in zip(fusion(feats, text), fusion(feats, text[order]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    classifier = TextAwareClassifier(query_dim=16, text_dim=TEXT_DIM)
    with torch.no_grad():
        classifier.query_proj.weight.normal_()
    queries = torch.randn(2, 7, 16)
    torch.testing.assert_close(classifier(queries, text[order]), classifier(queries, text)[..., order])


def test_fusion_rejects_wrong_level_count_and_indivisible_heads():
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs()
    with pytest.raises(ValueError, match="expected 2 feature levels, got 1"):
        fusion(feats[:1], text)
    with pytest.raises(ValueError, match="not divisible"):
        MultimodalFusionModule((30,), TEXT_DIM, num_heads=4)


def test_text_classifier_adds_exact_zero_at_init_then_a_scaled_bilinear_score_of_the_centred_text():
    torch.manual_seed(0)
    classifier = TextAwareClassifier(query_dim=16, text_dim=TEXT_DIM)
    queries = torch.randn(2, 7, 16)
    _, text = make_inputs()
    out = classifier(queries, text)
    assert out.shape == (2, 7, NUM_CLASSES)
    assert torch.count_nonzero(out) == 0

    weight = torch.randn(TEXT_DIM, 16)
    with torch.no_grad():
        classifier.query_proj.weight.copy_(weight)
    centred = text - text.mean(dim=0)
    expected = torch.einsum("bqd,td,kt->bqk", queries, weight, centred) / math.sqrt(16)
    torch.testing.assert_close(classifier(queries, text), expected, rtol=1e-5, atol=1e-5)


def test_fusion_cost_matches_counted_flops_and_parameter_count():
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs(batch=1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fusion(feats, text)
    cost = fusion_cost(fusion, [tuple(f.shape[1:]) for f in feats], NUM_CLASSES)
    # The counter sees the linear layers (addmm, mm) but not the fused CPU attention kernel: add QKᵀ and AV,
    # 2·N·K·C each; mean-centring and the norms are left out of both.
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.aten.addmm, torch.ops.aten.mm}
    tokens = sum(f.shape[2] * f.shape[3] for f in feats)
    assert cost["flops"] == counter.get_total_flops() + 2 * (2 * tokens * NUM_CLASSES * 32)
    # Per level: text Linear+LayerNorm, visual LayerNorm, query and key (with bias), value and output (without).
    per_level = (TEXT_DIM * 32 + 32) + 2 * 32 + 2 * 32 + 2 * (32 * 32 + 32) + 2 * 32 * 32
    assert cost["params"] == 2 * per_level
