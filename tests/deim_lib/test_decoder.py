"""DEIMTransformer and its parts: official key layout and checkpoint loading, FDR maths, deformable-attention and
denoising facts, training-output structure, gradients, score_bias and deploy."""

import math

import pytest
import torch

from deim_lib.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from deim_lib.decoder.deformable_attention import MSDeformableAttention
from deim_lib.decoder.deim_transformer import DEIMTransformer
from deim_lib.decoder.denoising import contrastive_denoising_group
from deim_lib.decoder.fdr import (
    bbox2distance,
    deploy_weighting_function,
    distance2bbox,
    integral,
    weighting_function,
)

ATTO = {
    "hidden_dim": 64,
    "num_queries": 100,
    "feat_channels": [64, 64],
    "feat_strides": [16, 32],
    "num_levels": 2,
    "num_points": [4, 2],
    "num_layers": 3,
    "dim_feedforward": 160,
    "reg_scale": 4,
    "use_gateway": False,
    "share_bbox_head": True,
    "eval_spatial_size": (320, 320),
}
S = {
    "hidden_dim": 192,
    "num_queries": 300,
    "feat_channels": [192] * 3,
    "feat_strides": [8, 16, 32],
    "num_levels": 3,
    "num_points": [3, 6, 3],
    "num_layers": 4,
    "dim_feedforward": 512,
    "reg_scale": 4,
    "use_gateway": True,
    "share_bbox_head": False,
    "eval_spatial_size": (640, 640),
}
CONFIGS = {"atto": ATTO, "s": S}
# Training regenerates anchors for any feature size; these give Σ h·w ≥ Q with little compute.
TRAIN_SIZES = {"atto": [16, 8], "s": [16, 8, 4]}
LISTINGS = {"atto": "deimv2_keys_atto.txt", "s": "deimv2_keys_S.txt"}
W_REG_SCALE_4 = [-4, -1.999999, -1.78813, -1.591224, -1.408224, -1.238148, -1.080083, -0.933182, -0.796655, -0.66977]
W_REG_SCALE_4 += [-0.551845, -0.442249, -0.340393, -0.245731, -0.157754, -0.07599, 0]
W_REG_SCALE_8 = [-8, -4.000002, -3.491301, -3.034356, -2.623899, -2.255203, -1.924019, -1.626529, -1.359305]
W_REG_SCALE_8 += [-1.119269, -0.903654, -0.709976, -0.536003, -0.37973, -0.239356, -0.113264, 0]


def _targets(counts: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, 6, (n,), generator=generator),
            "boxes": torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=generator), 0.1 + 0.3 * torch.rand(n, 2)], 1),
        }
        for n in counts
    ]


def _feats(config: dict, sizes: list[int], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, s, s, generator=generator) for c, s in zip(config["feat_channels"], sizes, strict=True)
    ]


def _perturbed(config: dict, num_classes: int = 6, seed: int = 0) -> DEIMTransformer:
    """A decoder whose zero-initialised layers are perturbed, so every path carries signal (like a trained one)."""
    torch.manual_seed(seed)
    model = DEIMTransformer(num_classes, **config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))
    return model


def _decoder_state_dict(reference_dir, variant: str) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(reference_dir / f"deimv2_{variant}_c6.pth", weights_only=True)
    return {
        key.removeprefix("decoder."): value.float() if value.dtype == torch.float16 else value
        for key, value in checkpoint["ema"]["module"].items()
        if key.startswith("decoder.")
    }


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_state_dict_keys_shapes_dtypes_and_order_equal_official_listing(reference_dir, variant):
    expected = []
    for line in (reference_dir / LISTINGS[variant]).read_text().splitlines():
        if line.startswith("decoder."):
            key, shape, dtype, _ = line.split("\t")
            expected.append((key.removeprefix("decoder."), shape, dtype))
    state_dict = DEIMTransformer(80, **CONFIGS[variant]).state_dict()
    ours = [(k, str(list(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]
    assert ours == expected


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_official_decoder_weights_load_strictly_with_identical_derived_buffers(reference_dir, variant):
    stored = _decoder_state_dict(reference_dir, variant)
    model = DEIMTransformer(6, **CONFIGS[variant])
    # Buffers the model derives itself must equal the stored ones: the anchors are logits, and the vectorised log of
    # torch builds differs by up to one float32 ulp (1.19e-7 here), so they are compared to two ulps; the rest exactly.
    torch.testing.assert_close(model.anchors, stored["anchors"], rtol=2.4e-7, atol=2.4e-7)
    assert torch.equal(model.valid_mask, stored["valid_mask"])
    for i, layer in enumerate(model.decoder.layers):
        assert torch.equal(layer.cross_attn.num_points_scale, stored[f"decoder.layers.{i}.cross_attn.num_points_scale"])
    model.load_state_dict(stored, strict=True)
    assert model.reg_scale.dtype == torch.int64 and model.reg_scale.item() == 4
    assert model.valid_mask.dtype == torch.bool and model.anchors.dtype == torch.float32
    assert model.decoder.up is model.up and model.decoder.reg_scale is model.reg_scale
    assert not model.up.requires_grad and not model.reg_scale.requires_grad
    shared = all(head is model.dec_bbox_head[0] for head in model.dec_bbox_head)
    assert shared == CONFIGS[variant]["share_bbox_head"]


def test_anchors_are_logits_of_cell_centres_and_inf_outside_the_valid_band():
    model = DEIMTransformer(6, **ATTO)
    assert model.anchors.shape == (1, 500, 4) and model.valid_mask.shape == (1, 500, 1)
    boxes = torch.sigmoid(model.anchors[0, model.valid_mask[0, :, 0]])
    first = torch.sigmoid(model.anchors[0, 21])  # level 0 (20×20), row 1, column 1
    torch.testing.assert_close(first, torch.tensor([1.5 / 20, 1.5 / 20, 0.05, 0.05]))
    assert ((boxes > 0.01) & (boxes < 0.99)).all()
    assert torch.isinf(model.anchors[0, ~model.valid_mask[0, :, 0]]).all()
    # Border cells of the 20×20 level (centre 0.025) are valid; the coarse level's size 0.1 is valid everywhere.
    assert model.valid_mask.sum() == 500


@pytest.mark.parametrize(("reg_scale", "half"), [(4, W_REG_SCALE_4), (8, W_REG_SCALE_8)])
def test_weighting_function_matches_official_values(reg_scale, half):
    up = torch.tensor([0.5])
    values = weighting_function(32, up, torch.tensor([reg_scale]))
    expected = torch.tensor(half + [-v for v in reversed(half[:-1])])
    assert values.shape == (33,) and values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=0, atol=2e-6)
    deploy = deploy_weighting_function(32, 0.5, float(reg_scale), torch.float32)
    torch.testing.assert_close(deploy, values, rtol=0, atol=2e-6)


def test_integral_is_softmax_expectation_and_distance2bbox_inverts_bbox2distance():
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4])
    project = weighting_function(32, up, reg_scale)
    logits = torch.full((1, 2, 132), -1e4)
    logits[0, 0, [16, 33 + 20, 66 + 16, 99 + 12]] = 0.0  # one-hot bins → exactly those W values
    logits[0, 1] = 0.0  # uniform → mean of W, which is 0 by symmetry
    distances = integral(logits, project)
    torch.testing.assert_close(distances[0, 0], project[[16, 20, 16, 12]])
    torch.testing.assert_close(distances[0, 1], torch.zeros(4), atol=1e-6, rtol=0)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]])
    gt = torch.tensor([[0.35, 0.4, 0.7, 0.62], [0.27, 0.5, 0.36, 0.72]])
    target, weight_right, weight_left = bbox2distance(ref, gt, 32, reg_scale, up)
    left = target.floor().long()
    decoded = project[left] * weight_left + project[left + 1] * weight_right
    torch.testing.assert_close(box_cxcywh_to_xyxy(distance2bbox(ref, decoded.reshape(2, 4), reg_scale)), gt)
    torch.testing.assert_close(weight_left + weight_right, torch.ones(8))


def test_bbox2distance_clamps_offsets_outside_the_bin_range():
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4])
    ref = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    # Offsets in units of size/4 beyond the half-size: left 18 (> 4), top -4.4 (< -4), right exactly 0 (bin 16).
    gt = torch.tensor([[0.0, 0.56, 0.55, 0.6]])
    target, weight_right, weight_left = bbox2distance(ref, gt, 32, reg_scale, up)
    assert target[0] == pytest.approx(31.9) and weight_right[0] == 1 and weight_left[0] == 0
    assert target[1] == 0 and weight_right[1] == 0 and weight_left[1] == 1
    assert target[2] == 16 and weight_right[2] == pytest.approx(0, abs=1e-4)


def test_deformable_attention_init_pattern_and_point_scale():
    attention = MSDeformableAttention(192, 8, [3, 6, 3])
    bias = attention.sampling_offsets.bias.reshape(8, 12, 2)
    steps = torch.tensor([1, 2, 3, 1, 2, 3, 4, 5, 6, 1, 2, 3], dtype=torch.float32)
    torch.testing.assert_close(bias[0], torch.stack([steps, torch.zeros(12)], -1))
    torch.testing.assert_close(bias[1], torch.stack([steps, steps], -1))
    torch.testing.assert_close(bias[2], torch.stack([torch.zeros(12), steps], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4], torch.stack([-steps, torch.zeros(12)], -1), atol=1e-6, rtol=0)
    assert attention.sampling_offsets.weight.abs().sum() == 0 and attention.attention_weights.weight.abs().sum() == 0
    assert attention.sampling_offsets.weight.shape == (192, 192) and attention.attention_weights.weight.shape == (
        96,
        192,
    )
    torch.testing.assert_close(attention.num_points_scale, torch.tensor([1 / 3] * 3 + [1 / 6] * 6 + [1 / 3] * 3))
    scale_42 = MSDeformableAttention(64, 8, [4, 2]).num_points_scale
    torch.testing.assert_close(scale_42, torch.tensor([0.25] * 4 + [0.5] * 2))
    torch.testing.assert_close(MSDeformableAttention(128, 8, [6, 6]).num_points_scale, torch.full((12,), 1 / 6))


def test_deformable_attention_samples_the_value_at_the_reference_centre():
    attention = MSDeformableAttention(16, 2, [1, 1])
    with torch.no_grad():
        attention.sampling_offsets.bias.zero_()
    value_maps = [torch.arange(16.0).reshape(1, 16, 1, 1).expand(1, 16, 4, 4), torch.ones(1, 16, 2, 2)]
    value = [v.reshape(1, 2, 8, -1).reshape(2, 8, *v.shape[2:]) for v in value_maps]
    ref = torch.tensor([0.5, 0.5, 0.2, 0.2]).reshape(1, 1, 1, 4)
    out = attention(torch.zeros(1, 1, 16), ref, value, [(4, 4), (2, 2)])
    # Equal weights over the two levels: mean of the channel index and 1.
    torch.testing.assert_close(out[0, 0], (torch.arange(16.0) + 1) / 2)


def test_denoising_group_sizes_positive_indices_and_attention_mask():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(7, 32, padding_idx=6)
    group = contrastive_denoising_group(_targets([3, 1]), 6, 300, embed)
    meta = group.dn_meta
    assert meta["dn_num_group"] == 33 and meta["dn_num_split"] == [198, 300]
    assert group.content.shape == (2, 198, 32) and group.ref_points_unact.shape == (2, 198, 4)
    assert group.attn_mask.shape == (498, 498) and group.attn_mask.dtype == torch.bool
    assert meta["dn_positive_idx"][0][:6].tolist() == [0, 1, 2, 6, 7, 8] and len(meta["dn_positive_idx"][0]) == 99
    assert meta["dn_positive_idx"][1][:3].tolist() == [0, 6, 12] and len(meta["dn_positive_idx"][1]) == 33
    mask = group.attn_mask
    assert mask[198:, :198].all() and not mask[198:, 198:].any() and not mask[:198, 198:].any()
    assert not mask[6:12, 6:12].any() and mask[6:12, :6].all() and mask[6:12, 12:198].all()
    # Padded slots of image 1 embed the zero padding row.
    assert group.content[1, 1].abs().sum() == 0


def test_denoising_noise_follows_official_rng_order_and_magnitudes():
    targets = _targets([3, 1])
    embed = torch.nn.Embedding(7, 8, padding_idx=6)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(7.0)[:, None].expand(7, 8))  # row c encodes class c
    torch.manual_seed(1)
    group = contrastive_denoising_group(targets, 6, 300, embed)
    torch.manual_seed(1)
    flip = torch.rand(2, 198) < 0.25
    random_labels = torch.randint(0, 6, (2, 198), dtype=torch.int32)
    sign = torch.randint(0, 2, (2, 198, 4)).float() * 2 - 1
    magnitude = torch.rand(2, 198, 4)
    labels = torch.full((2, 3), 6)
    boxes = torch.zeros(2, 3, 4)
    for i, t in enumerate(targets):
        labels[i, : len(t["labels"])] = t["labels"]
        boxes[i, : len(t["labels"])] = t["boxes"]
    labels, boxes = labels.tile(1, 66), boxes.tile(1, 66, 1)
    real = labels < 6
    expected_labels = torch.where(flip & real, random_labels.long(), labels)
    assert torch.equal(group.content[..., 0].long(), expected_labels)
    negative = (torch.arange(198) // 3 % 2 == 1)[None, :, None]
    half = (boxes[..., 2:] * 0.5).tile(1, 1, 2)
    expected = (box_cxcywh_to_xyxy(boxes) + sign * (magnitude + negative) * half).clip(0, 1)
    # Clipping can swap an edge pair; the negative width/height is then negated.
    expected = box_xyxy_to_cxcywh(expected).abs()
    noisy = torch.sigmoid(group.ref_points_unact)
    torch.testing.assert_close(noisy[real], expected[real], atol=2e-5, rtol=0)
    positive = real & ~negative[..., 0]
    assert (noisy[positive] - boxes[positive]).abs().amax() <= boxes[..., 2:].amax()


def test_denoising_is_skipped_without_ground_truth():
    embed = torch.nn.Embedding(7, 8, padding_idx=6)
    assert contrastive_denoising_group(_targets([0, 0]), 6, 300, embed) is None
    assert contrastive_denoising_group(_targets([2]), 6, 300, embed, num_denoising=0) is None


def test_initialisation_biases_zero_heads_and_identical_layer_copies():
    model = DEIMTransformer(80, **S)
    prior = -math.log((1 - 0.01) / 0.01)
    assert model.enc_score_head.bias[0].item() == pytest.approx(-4.59512, abs=1e-5)
    for head in model.dec_score_head:
        torch.testing.assert_close(head.bias, torch.full((80,), prior))
    for head in [model.enc_bbox_head, model.pre_bbox_head, *model.dec_bbox_head]:
        assert head.layers[-1].weight.abs().sum() == 0 and head.layers[-1].bias.abs().sum() == 0
    layer0, layer3 = model.decoder.layers[0].state_dict(), model.decoder.layers[3].state_dict()
    assert all(torch.equal(layer0[k], layer3[k]) for k in layer0)
    assert torch.equal(model.dec_bbox_head[0].layers[0].weight, model.dec_bbox_head[3].layers[0].weight)
    assert model.dec_bbox_head[0] is not model.dec_bbox_head[3]
    assert model.denoising_class_embed.weight[80].abs().sum() == 0
    gate = model.decoder.layers[0].gateway.gate
    assert gate.weight.abs().sum() == 0 and gate.bias.abs().sum() == 0


def test_training_outputs_have_official_structure_and_shapes():
    torch.manual_seed(0)
    model = DEIMTransformer(80, **S).train()
    out = model(_feats(S, [16, 8, 4]), _targets([3, 1]))
    assert list(out) == [
        "pred_logits",
        "pred_boxes",
        "pred_corners",
        "ref_points",
        "up",
        "reg_scale",
        "aux_outputs",
        "enc_aux_outputs",
        "pre_outputs",
        "enc_meta",
        "dn_outputs",
        "dn_pre_outputs",
        "dn_meta",
    ]
    assert out["pred_logits"].shape == (2, 300, 80) and out["pred_boxes"].shape == (2, 300, 4)
    assert out["pred_corners"].shape == (2, 300, 132) and out["ref_points"].shape == (2, 300, 4)
    assert out["up"] is model.up and out["reg_scale"] is model.reg_scale
    assert len(out["aux_outputs"]) == 3 and len(out["dn_outputs"]) == 4 and len(out["enc_aux_outputs"]) == 1
    layer_keys = {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners", "teacher_logits"}
    assert all(set(aux) == layer_keys for aux in out["aux_outputs"] + out["dn_outputs"])
    assert out["aux_outputs"][0]["teacher_corners"] is out["pred_corners"]
    assert out["dn_outputs"][0]["teacher_logits"] is out["dn_outputs"][-1]["pred_logits"]
    assert out["dn_outputs"][2]["pred_corners"].shape == (2, 198, 132)
    assert out["dn_pre_outputs"]["pred_logits"].shape == (2, 198, 80)
    assert out["pre_outputs"]["pred_boxes"].shape == (2, 300, 4)
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, 300, 80)
    assert out["enc_meta"] == {"class_agnostic": False} and out["dn_meta"]["dn_num_split"] == [198, 300]
    # Fresh init: corner heads start at zero, so every layer equals its teacher (no DDF at step 0) and boxes = ref0.
    assert out["aux_outputs"][0]["pred_corners"].abs().sum() == 0
    torch.testing.assert_close(out["pred_boxes"], out["ref_points"])


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_training_loss_backpropagates_into_every_trainable_parameter(variant):
    config = CONFIGS[variant]
    model = _perturbed(config).train()
    out = model(_feats(config, TRAIN_SIZES[variant]), _targets([3, 1]))
    leaves = [out["pred_logits"], out["pred_boxes"], out["pred_corners"]]
    for part in out["aux_outputs"] + out["dn_outputs"] + out["enc_aux_outputs"]:
        leaves += [part["pred_logits"], part["pred_boxes"]] + ([part["pred_corners"]] if "pred_corners" in part else [])
    for part in (out["pre_outputs"], out["dn_pre_outputs"]):
        leaves += [part["pred_logits"], part["pred_boxes"]]
    sum(leaf.sin().sum() for leaf in leaves).backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_eval_outputs_only_final_predictions_and_rejects_other_input_sizes():
    model = _perturbed(ATTO).eval()
    with torch.no_grad():
        out = model(_feats(ATTO, [20, 10]))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 100, 6) and out["pred_boxes"].shape == (2, 100, 4)
    with pytest.raises(ValueError, match="eval_spatial_size"):
        model(_feats(ATTO, [16, 8]))


def test_score_bias_is_added_to_every_score_head_before_lqe():
    model = _perturbed(S)
    feats, targets = _feats(S, [16, 8, 4]), _targets([3, 1])
    seen_shapes = []

    def bias(queries: torch.Tensor) -> torch.Tensor:
        seen_shapes.append(tuple(queries.shape))
        return queries[..., :6] * 0.0 + torch.arange(6.0)

    torch.manual_seed(0)
    plain = model.train()(feats, targets)
    torch.manual_seed(0)
    biased = model(feats, targets, score_bias=bias)
    assert seen_shapes == [(2, 498, 192)] * 4
    shift = torch.arange(6.0)
    for key in ("pre_outputs", "dn_pre_outputs"):
        torch.testing.assert_close(biased[key]["pred_logits"], plain[key]["pred_logits"] + shift)
    for ours, ref in zip(
        biased["aux_outputs"] + biased["dn_outputs"], plain["aux_outputs"] + plain["dn_outputs"], strict=True
    ):
        torch.testing.assert_close(ours["pred_logits"], ref["pred_logits"] + shift)
        torch.testing.assert_close(ours["pred_boxes"], ref["pred_boxes"])
    model.eval()
    with torch.no_grad():
        eval_feats = _feats(S, [80, 40, 20], batch=1)
        torch.testing.assert_close(
            model(eval_feats, score_bias=bias)["pred_logits"], model(eval_feats)["pred_logits"] + shift
        )


def test_deploy_keeps_eval_outputs_and_drops_unused_heads():
    model = _perturbed(ATTO).eval()
    feats = _feats(ATTO, [20, 10])
    with torch.no_grad():
        before = model(feats)
        model.convert_to_deploy()
        after = model(feats)
    assert isinstance(model.dec_score_head[0], torch.nn.Identity) and isinstance(
        model.dec_score_head[1], torch.nn.Identity
    )
    assert isinstance(model.decoder.lqe_layers[1], torch.nn.Identity) and not isinstance(
        model.decoder.lqe_layers[2], torch.nn.Identity
    )
    assert model.decoder.project.shape == (33,)
    torch.testing.assert_close(after["pred_logits"], before["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(after["pred_boxes"], before["pred_boxes"], atol=1e-6, rtol=0)
