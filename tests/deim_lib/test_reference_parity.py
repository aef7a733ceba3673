"""Official checkpoints load strictly and reproduce the official eval outputs and detections (float32, CPU)."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from deim_lib import PostProcessor, build_detector, load_official_checkpoint

VARIANTS = ["atto", "s"]


def load_reference(reference_dir, variant):
    io = torch.load(reference_dir / f"deimv2_{variant}_c6_io.pt", weights_only=True)
    state_dict = load_official_checkpoint(reference_dir / f"deimv2_{variant}_c6.pth")
    model = build_detector(variant, io["num_classes"])
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), io


def assert_rows_match(ours: torch.Tensor, reference: torch.Tensor, tolerances: torch.Tensor):
    """Index-wise, or else a one-to-one row matching (near-tied selected queries may swap neighbours)."""
    if ((ours - reference).abs() <= tolerances).all():
        return
    cost = (ours[:, None, :] - reference[None, :, :]).abs().div(tolerances).amax(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    assert cost[rows, cols].max() <= 1.0, f"rows differ beyond tolerance: worst {cost[rows, cols].max():.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_checkpoint_reproduces_eval_outputs(reference_dir, variant):
    model, io = load_reference(reference_dir, variant)
    with torch.no_grad():
        outputs = model(io["pixel_values"])
    expected = io["eval"]
    assert outputs["pred_logits"].shape == expected["pred_logits"].shape
    num_classes = expected["pred_logits"].shape[-1]
    tolerances = torch.tensor([1e-4] * num_classes + [1e-5] * 4)
    for image in range(len(io["pixel_values"])):
        ours = torch.cat([outputs["pred_logits"][image], outputs["pred_boxes"][image]], dim=-1)
        reference = torch.cat([expected["pred_logits"][image], expected["pred_boxes"][image]], dim=-1)
        assert_rows_match(ours, reference, tolerances)


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_checkpoint_reproduces_postprocessed_detections(reference_dir, variant):
    model, io = load_reference(reference_dir, variant)
    postprocessor = PostProcessor(num_classes=io["num_classes"], num_top_queries=300)
    with torch.no_grad():
        detections = postprocessor(model(io["pixel_values"]), io["orig_target_sizes"])
    for ours, reference in zip(detections, io["postprocessed"], strict=True):
        assert ours["labels"].dtype == torch.int64 and len(ours["scores"]) == 300
        torch.testing.assert_close(ours["scores"], reference["scores"], rtol=0, atol=1e-5)
        # Every detection must match a distinct reference detection: same label, score and box within tolerance.
        same_label = ours["labels"][:, None] == reference["labels"][None, :]
        score_gap = (ours["scores"][:, None] - reference["scores"][None, :]).abs()
        box_gap = (ours["boxes"][:, None, :] - reference["boxes"][None, :, :]).abs().amax(-1)
        feasible = same_label & (score_gap <= 1e-5) & (box_gap <= 1e-2)
        rows, cols = linear_sum_assignment((~feasible).float().numpy())
        assert feasible[rows, cols].all(), f"{(~feasible[rows, cols]).sum()} detections have no reference match"


def test_default_weights_are_the_ema_not_the_decoy_model(reference_dir):
    checkpoint = torch.load(reference_dir / "deimv2_atto_c6.pth", weights_only=True)
    state_dict = load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth")
    key = "decoder.enc_score_head.weight"
    assert torch.equal(state_dict[key], checkpoint["ema"]["module"][key])
    assert checkpoint["model"][key].abs().sum() == 0 and state_dict[key].abs().sum() > 0
