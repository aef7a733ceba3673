"""MultimodalFusionModule and TextAwareClassifier: exact identity at init, gradient flow, analytic cost."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from multimodal.fusion import MultimodalFusionModule, TextAwareClassifier, fusion_cost

CHANNELS = (32, 32)
TEXT_DIM = 24
NUM_CLASSES = 5


def make_inputs(batch: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, c, s, s + 1, generator=generator) for c, s in zip(CHANNELS, (8, 4), strict=True)]
    return feats, F.normalize(torch.randn(NUM_CLASSES, TEXT_DIM, generator=generator), dim=-1)


def test_fusion_output_equals_input_bit_exactly_at_init():
    torch.manual_seed(0)
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs()
    out = fusion(feats, text)
    assert [o.shape for o in out] == [f.shape for f in feats]
    assert all(torch.equal(o, f) for o, f in zip(out, feats, strict=True))
    assert fusion.gate_values() == [0.0, 0.0]


def test_only_gates_get_gradient_at_init_and_every_parameter_after_one_step():
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
        if name.endswith("alpha"):
            assert param.grad.abs().item() > 0, name
        else:
            assert torch.count_nonzero(param.grad) == 0, name

    torch.optim.AdamW(fusion.parameters(), lr=1e-2).step()
    backward()
    assert all(gate != 0.0 for gate in fusion.gate_values())
    for name, param in fusion.named_parameters():
        assert param.grad.abs().sum() > 0, name
    assert not any(torch.equal(o, f) for o, f in zip(fusion(feats, text), feats, strict=True))


def test_fusion_rejects_wrong_level_count_and_indivisible_heads():
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs()
    with pytest.raises(ValueError, match="expected 2 feature levels, got 1"):
        fusion(feats[:1], text)
    with pytest.raises(ValueError, match="not divisible"):
        MultimodalFusionModule((30,), TEXT_DIM, num_heads=4)


def test_text_classifier_adds_exact_zero_at_init_then_scaled_cosine_similarity():
    torch.manual_seed(0)
    classifier = TextAwareClassifier(query_dim=16, text_dim=TEXT_DIM)
    queries = torch.randn(2, 7, 16)
    _, text = make_inputs()
    out = classifier(queries, text)
    assert out.shape == (2, 7, NUM_CLASSES)
    assert torch.count_nonzero(out) == 0

    with torch.no_grad():
        classifier.scale.fill_(3.0)
    projected = classifier.query_proj(queries)
    expected = 3.0 * F.cosine_similarity(projected.unsqueeze(2), text.view(1, 1, NUM_CLASSES, TEXT_DIM), dim=-1)
    torch.testing.assert_close(classifier(queries, text), expected, rtol=0, atol=1e-5)


def test_fusion_cost_matches_counted_flops_and_parameter_count():
    fusion = MultimodalFusionModule(CHANNELS, TEXT_DIM, num_heads=4)
    feats, text = make_inputs(batch=1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fusion(feats, text)
    cost = fusion_cost(fusion, [tuple(f.shape[1:]) for f in feats], NUM_CLASSES)
    # The counter sees the linear layers (addmm) but not the fused CPU attention kernel: add QKᵀ and AV, 2·N·K·C each.
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.aten.addmm}
    tokens = sum(f.shape[2] * f.shape[3] for f in feats)
    assert cost["flops"] == counter.get_total_flops() + 2 * (2 * tokens * NUM_CLASSES * 32)
    # Per level: text Linear+LayerNorm, visual LayerNorm, MultiheadAttention (in/out projections), alpha.
    per_level = (TEXT_DIM * 32 + 32) + 2 * 32 + 2 * 32 + (3 * 32 * 32 + 3 * 32) + (32 * 32 + 32) + 1
    assert cost["params"] == 2 * per_level
