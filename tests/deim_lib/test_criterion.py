"""HungarianMatcher and DEIMCriterion: parity with the official losses and matching, and their defining properties."""

import math

import pytest
import torch

from deim_lib.criterion.deim_criterion import DEIMCriterion
from deim_lib.criterion.matcher import HungarianMatcher

WEIGHTS = {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
NUM_CLASSES = 6


def _criterion(variant: str, matcher_change_epoch: int = 100) -> DEIMCriterion:
    local = variant not in ("atto", "femto", "pico")
    losses = ("mal", "boxes", "local") if local else ("mal", "boxes")
    matcher = HungarianMatcher(matcher_change_epoch=matcher_change_epoch)
    return DEIMCriterion(matcher, WEIGHTS, losses, NUM_CLASSES, use_uni_set=local)


def _random_targets(counts: list[int], generator: torch.Generator) -> list[dict]:
    targets = []
    for n in counts:
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=generator)
        size = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return targets


def _synthetic_outputs(B: int, Q: int, num_layers: int, generator: torch.Generator, dn_targets=None) -> dict:
    """Training outputs shaped like the decoder's, from random leaves (requires_grad) so gradients can be checked."""
    bins = 4 * 33

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).requires_grad_()

    def boxes(n):
        return (0.3 + 0.4 * torch.rand(B, n, 4, generator=generator)).requires_grad_()

    def layers(n):
        ref = 0.3 + 0.4 * torch.rand(B, n, 4, generator=generator)
        outs = [
            {"pred_logits": leaf(B, n, NUM_CLASSES), "pred_boxes": boxes(n), "pred_corners": leaf(B, n, bins)}
            for _ in range(num_layers)
        ]
        for out in outs:
            out["ref_points"] = ref
        for out in outs[:-1]:
            out["teacher_corners"], out["teacher_logits"] = outs[-1]["pred_corners"], outs[-1]["pred_logits"]
        return outs

    main_layers = layers(Q)
    outputs = dict(main_layers[-1])
    outputs |= {
        "up": torch.tensor([0.5]),
        "reg_scale": torch.tensor([4]),
        "aux_outputs": main_layers[:-1],
        "pre_outputs": {"pred_logits": leaf(B, Q, NUM_CLASSES), "pred_boxes": boxes(Q)},
        "enc_aux_outputs": [{"pred_logits": leaf(B, Q, NUM_CLASSES), "pred_boxes": boxes(Q)}],
    }
    if dn_targets is not None:
        M = max(len(t["labels"]) for t in dn_targets)
        G = 4
        dn_layers = layers(2 * M * G)
        for out in dn_layers:
            out["teacher_corners"], out["teacher_logits"] = dn_layers[-1]["pred_corners"], dn_layers[-1]["pred_logits"]
        positive = [
            torch.cat([torch.arange(len(t["labels"])) + 2 * M * g for g in range(G)]).long() for t in dn_targets
        ]
        outputs |= {
            "dn_outputs": dn_layers,
            "dn_pre_outputs": {"pred_logits": leaf(B, 2 * M * G, NUM_CLASSES), "pred_boxes": boxes(2 * M * G)},
            "dn_meta": {"dn_positive_idx": tuple(positive), "dn_num_group": G, "dn_num_split": [2 * M * G, Q]},
        }
    return outputs


# --- matcher ---------------------------------------------------------------------------------------------------------


def test_matcher_batched_equals_per_image():
    generator = torch.Generator().manual_seed(0)
    targets = _random_targets([3, 0, 5, 1], generator)
    outputs = {"pred_logits": torch.randn(4, 20, NUM_CLASSES, generator=generator)}
    outputs["pred_boxes"] = 0.2 + 0.6 * torch.rand(4, 20, 4, generator=generator)
    for epoch in (0, 100):
        matcher = HungarianMatcher()
        batched = matcher(outputs, targets, epoch=epoch)
        for b, target in enumerate(targets):
            single = matcher({k: v[b : b + 1] for k, v in outputs.items()}, [target], epoch=epoch)[0]
            assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
            assert len(batched[b][0]) == len(target["labels"])
            assert batched[b][0].dtype == torch.int64 and torch.all(batched[b][0].diff() > 0)


def test_matcher_empty_targets_give_empty_int64_indices():
    outputs = {"pred_logits": torch.randn(2, 7, NUM_CLASSES), "pred_boxes": torch.rand(2, 7, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for indices in (HungarianMatcher()(outputs, [empty, empty]), HungarianMatcher()(outputs, [empty, empty], 200)):
        assert [(q.shape, g.shape, q.dtype, g.dtype) for q, g in indices] == [
            (torch.Size([0]), torch.Size([0]), torch.int64, torch.int64)
        ] * 2


def test_matcher_switches_to_iou_order_cost_at_change_epoch():
    # Query 0 is confident (p ≈ 0.99) but its box has IoU 0.5 with the target; query 1 is unsure (p = 0.2) but its
    # box is exact. The focal+L1+GIoU cost prefers the confident query, -p·IoU⁴ the exact one.
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    logits = torch.full((1, 2, NUM_CLASSES), -5.0)
    logits[0, 0, 2], logits[0, 1, 2] = math.log(0.99 / 0.01), math.log(0.2 / 0.8)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.2]]])
    matcher = HungarianMatcher(matcher_change_epoch=100)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    assert matcher(outputs, [target], epoch=99)[0][0].tolist() == [0]
    assert matcher(outputs, [target], epoch=100)[0][0].tolist() == [1]
    assert HungarianMatcher(change_matcher=False)(outputs, [target], epoch=500)[0][0].tolist() == [0]


# --- criterion on synthetic outputs ----------------------------------------------------------------------------------


def _expected_keys(num_layers: int, dn_layers: int | None) -> set[str]:
    keys = {f"loss_{n}" for n in ("mal", "bbox", "giou", "fgl")}
    for i in range(num_layers - 1):
        keys |= {f"loss_{n}_aux_{i}" for n in ("mal", "bbox", "giou", "fgl", "ddf")}
    keys |= {f"loss_{n}{s}" for n in ("mal", "bbox", "giou") for s in ("_pre", "_enc_0")}
    if dn_layers is not None:
        for i in range(dn_layers):
            keys |= {f"loss_{n}_dn_{i}" for n in ("mal", "bbox", "giou", "fgl")}
            keys |= {f"loss_ddf_dn_{i}"} if i < dn_layers - 1 else set()
        keys |= {f"loss_{n}_dn_pre" for n in ("mal", "bbox", "giou")}
    return keys


def test_criterion_key_set_and_finite_with_an_image_without_boxes():
    generator = torch.Generator().manual_seed(1)
    targets = _random_targets([3, 0], generator)
    outputs = _synthetic_outputs(2, 12, 3, generator, dn_targets=targets)
    losses = _criterion("s")(outputs, targets)
    assert set(losses) == _expected_keys(3, 3)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["aux_outputs"][0]["pred_corners"].grad).all()


def test_criterion_without_any_box_gives_finite_losses_and_no_matches():
    generator = torch.Generator().manual_seed(2)
    targets = _random_targets([0, 0], generator)
    outputs = _synthetic_outputs(2, 12, 3, generator)
    losses = _criterion("s")(outputs, targets)
    assert set(losses) == _expected_keys(3, None)
    assert all(torch.isfinite(v) for v in losses.values())
    # Nothing is matched: box and FGL terms vanish, MAL only pushes every score down.
    assert losses["loss_bbox"] == 0 and losses["loss_fgl_aux_0"] == 0 and losses["loss_mal"] > 0


def test_ddf_is_skipped_for_a_layer_identical_to_its_teacher():
    generator = torch.Generator().manual_seed(3)
    targets = _random_targets([2, 1], generator)
    outputs = _synthetic_outputs(2, 8, 3, generator)
    outputs["aux_outputs"][1]["pred_corners"] = outputs["pred_corners"]
    losses = _criterion("s")(outputs, targets)
    assert "loss_ddf_aux_0" in losses and "loss_ddf_aux_1" not in losses and "loss_fgl_aux_1" in losses


def test_light_variants_use_own_matching_and_no_distribution_losses():
    generator = torch.Generator().manual_seed(4)
    targets = _random_targets([2, 3], generator)
    outputs = _synthetic_outputs(2, 10, 3, generator)
    losses = _criterion("atto")(outputs, targets)
    names = ("mal", "bbox", "giou")
    suffixes = ("", "_aux_0", "_aux_1", "_pre", "_enc_0")
    assert set(losses) == {f"loss_{n}{s}" for n in names for s in suffixes}
    # Without the union set each output's box loss is that output's own Hungarian optimum over its L1/GIoU terms.
    indices = HungarianMatcher()(outputs["pre_outputs"], targets)
    pred = torch.cat([outputs["pre_outputs"]["pred_boxes"][b, q] for b, (q, _) in enumerate(indices)])
    gt = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, indices, strict=True)])
    torch.testing.assert_close(losses["loss_bbox_pre"], 5 * (pred - gt).abs().sum() / 5)


def test_mal_matches_hand_computed_value():
    # One image, one target matched to query 0; IoU(pred, gt) = 0.5, gamma 1.5.
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    logits = torch.tensor([[[0.3, 2.0, -1.0], [-2.0, -3.0, 0.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.05, 0.05]]])
    criterion = DEIMCriterion(HungarianMatcher(), {"loss_mal": 1.0}, ("mal",), num_classes=3)
    loss = criterion({"pred_logits": logits, "pred_boxes": boxes}, [target])["loss_mal"]

    p = logits.sigmoid()
    target_score = torch.zeros_like(p)
    target_score[0, 0, 1] = 0.5**1.5
    weight = p**1.5
    weight[0, 0, 1] = 1.0
    bce = -(target_score * p.log() + (1 - target_score) * (1 - p).log())
    torch.testing.assert_close(loss, (weight * bce).sum())


def test_union_indices_keep_each_query_once_with_its_most_frequent_target():
    from deim_lib.criterion.deim_criterion import _union_indices

    def pairs(*qg):
        return [(torch.tensor([q for q, _ in qg]), torch.tensor([g for _, g in qg]))]

    main, aux, pre = pairs((0, 0), (1, 1)), pairs((0, 1), (2, 1), (3, 1)), pairs((0, 0), (2, 0), (3, 1))
    ((queries, gts),) = _union_indices([main, aux, pre])
    # (0,0) and (3,1) occur twice and come first; query 2's tie (targets 0, 1 once each) goes to the first in
    # lexicographic order; a target may serve several queries.
    assert queries.tolist() == [0, 3, 1, 2] and gts.tolist() == [0, 1, 1, 0]


# --- parity with the official criterion and gradient flow through a real detector -------------------------------------


def _official_detector(reference_dir, variant: str):
    from deim_lib.model import build_detector

    checkpoint = torch.load(reference_dir / f"deimv2_{variant}_c6.pth", weights_only=True)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["ema"]["module"].items()}
    model = build_detector(variant, NUM_CLASSES)
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_losses_and_matching_equal_official_on_reference_fixture(reference_dir, variant):
    io = torch.load(reference_dir / f"deimv2_{variant}_c6_io.pt", weights_only=True)
    model = _official_detector(reference_dir, variant)
    model.decoder.num_denoising = 0  # the fixture's training forward ran without denoising
    model.train()
    criterion = _criterion(variant)
    outputs = model(io["pixel_values"], io["targets"])
    with torch.no_grad():
        losses = criterion(outputs, io["targets"], epoch=0)
        matching = criterion.matcher(outputs, io["targets"], epoch=0)

    expected = io["train_loss"]
    assert set(losses) == set(expected)
    for key, value in expected.items():
        if key.startswith("loss_ddf"):
            assert abs(losses[key].item() - value) <= 1e-6, key
        else:
            assert losses[key].item() == pytest.approx(value, rel=1e-4), key
    assert sum(v.item() for v in losses.values()) == pytest.approx(io["train_loss_total"], rel=1e-5)
    for (queries, gts), (ref_queries, ref_gts) in zip(matching, io["train_main_matching"], strict=True):
        assert torch.equal(queries, ref_queries) and torch.equal(gts, ref_gts)


def test_denoising_losses_exist_and_gradient_reaches_every_trainable_parameter(reference_dir):
    io = torch.load(reference_dir / "deimv2_s_c6_io.pt", weights_only=True)
    model = _official_detector(reference_dir, "s")
    model.train()
    # Training regenerates anchors and positional embeddings, so a half-size input keeps this test fast.
    images = torch.nn.functional.interpolate(io["pixel_values"], size=(320, 320), mode="bilinear")
    torch.manual_seed(0)
    outputs = model(images, io["targets"])
    losses = _criterion("s")(outputs, io["targets"])

    num_layers = len(outputs["aux_outputs"]) + 1
    assert set(losses) == _expected_keys(num_layers, num_layers)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []


# --- the batched criterion against the per-output, per-image implementation it replaced ------------------------------


def _denoising_batch() -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(7)
    targets = _random_targets([3, 0, 5, 1], generator)
    outputs = _synthetic_outputs(4, 12, 4, generator, dn_targets=targets)
    # Equal to the final layer by value but not the same tensor, as every layer of a freshly initialised model.
    outputs["aux_outputs"][1]["pred_corners"] = outputs["pred_corners"].detach().clone()
    return outputs, targets


# Recorded on torch 2.14.1 (CPU, float32) with the criterion as of commit 9a42564 (per-output, per-image gathers,
# boolean-indexed DDF means), before it was batched; tests/deim_lib/test_criterion.py::_denoising_batch, variant "s".
_RECORDED_DN_LOSSES = {
    "loss_bbox": 4.2005839347839355,
    "loss_bbox_aux_0": 4.409571170806885,
    "loss_bbox_aux_1": 3.8645200729370117,
    "loss_bbox_aux_2": 3.9167685508728027,
    "loss_bbox_dn_0": 4.195984840393066,
    "loss_bbox_dn_1": 3.964138984680176,
    "loss_bbox_dn_2": 3.7336409091949463,
    "loss_bbox_dn_3": 4.2996907234191895,
    "loss_bbox_dn_pre": 3.914012908935547,
    "loss_bbox_enc_0": 4.002609729766846,
    "loss_bbox_pre": 3.5026071071624756,
    "loss_ddf_aux_0": 0.5893865823745728,
    "loss_ddf_aux_2": 0.6179748177528381,
    "loss_ddf_dn_0": 0.610152006149292,
    "loss_ddf_dn_1": 0.61997389793396,
    "loss_ddf_dn_2": 0.6380031108856201,
    "loss_fgl": 0.2862747311592102,
    "loss_fgl_aux_0": 0.26268085837364197,
    "loss_fgl_aux_1": 0.3337160646915436,
    "loss_fgl_aux_2": 0.3172589838504791,
    "loss_fgl_dn_0": 0.2719649076461792,
    "loss_fgl_dn_1": 0.2982110381126404,
    "loss_fgl_dn_2": 0.34095415472984314,
    "loss_fgl_dn_3": 0.28897929191589355,
    "loss_giou": 1.9682135581970215,
    "loss_giou_aux_0": 2.043649435043335,
    "loss_giou_aux_1": 1.9751683473587036,
    "loss_giou_aux_2": 1.9180105924606323,
    "loss_giou_dn_0": 2.1121861934661865,
    "loss_giou_dn_1": 1.9902303218841553,
    "loss_giou_dn_2": 1.9474669694900513,
    "loss_giou_dn_3": 1.957171082496643,
    "loss_giou_dn_pre": 1.9012154340744019,
    "loss_giou_enc_0": 1.8659659624099731,
    "loss_giou_pre": 1.8175158500671387,
    "loss_mal": 13.602826118469238,
    "loss_mal_aux_0": 13.545184135437012,
    "loss_mal_aux_1": 13.96157455444336,
    "loss_mal_aux_2": 13.38332748413086,
    "loss_mal_dn_0": 11.62820816040039,
    "loss_mal_dn_1": 11.580836296081543,
    "loss_mal_dn_2": 11.689282417297363,
    "loss_mal_dn_3": 11.205753326416016,
    "loss_mal_dn_pre": 11.568873405456543,
    "loss_mal_enc_0": 13.286848068237305,
    "loss_mal_pre": 13.066167831420898,
}


def test_batched_criterion_with_denoising_equals_the_recorded_per_image_losses():
    outputs, targets = _denoising_batch()
    losses = _criterion("s")(outputs, targets)
    assert set(losses) == _expected_keys(4, 4) - {"loss_ddf_aux_1"} == set(_RECORDED_DN_LOSSES)
    for key, value in _RECORDED_DN_LOSSES.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_criterion_reads_nothing_back_on_the_host_but_the_teacher_check():
    outputs, targets = _denoising_batch()
    criterion = _criterion("s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        criterion(outputs, targets)
    calls = [e.name for e in prof.events()]
    reads = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
    assert [name for name in calls if name in reads] == []
    # On the CPU the teacher check is torch.equal, once per layer that is not the final one of its kind (3 + 3).
    assert calls.count("aten::equal") == 6


def test_matching_several_outputs_at_once_equals_matching_each():
    outputs, targets = _denoising_batch()
    layers = [outputs, *outputs["aux_outputs"], outputs["pre_outputs"], *outputs["enc_aux_outputs"]]
    for epoch in (0, 100):
        matcher = HungarianMatcher()
        together = matcher(layers, targets, epoch)
        assert len(together) == len(layers)
        for layer, matching in zip(layers, together, strict=True):
            for (queries, gts), (ref_queries, ref_gts) in zip(matching, matcher(layer, targets, epoch), strict=True):
                assert torch.equal(queries, ref_queries) and torch.equal(gts, ref_gts)


def _union_by_rows(matchings):
    """The union as official DEIMv2 writes it: unique rows, argsort of their counts, first pair of each query."""
    union = []
    for per_image in zip(*matchings, strict=True):
        pairs = torch.cat([torch.stack([q, g], dim=1) for q, g in per_image])
        unique, counts = torch.unique(pairs, dim=0, return_counts=True)
        ranked = unique[torch.argsort(counts, descending=True)]
        seen, kept = set(), []
        for query, gt in ranked.tolist():
            if query not in seen:
                seen.add(query)
                kept.append((query, gt))
        union.append((torch.tensor([q for q, _ in kept]), torch.tensor([g for _, g in kept])))
    return union


def test_union_indices_break_ties_as_the_row_wise_union_with_many_pairs_per_image():
    from deim_lib.criterion.deim_criterion import _union_indices

    # Over 16 distinct pairs per image, torch's unstable CPU argsort no longer keeps ties in input order.
    generator = torch.Generator().manual_seed(5)
    matchings = []
    for _ in range(7):
        images = []
        for num_gt in (9, 0, 14):
            queries = torch.randperm(30, generator=generator)[:num_gt].sort().values
            images.append((queries, torch.randint(0, max(num_gt, 1), (num_gt,), generator=generator)))
        matchings.append(images)
    union = _union_indices(matchings)
    expected = _union_by_rows(matchings)
    assert min(len(queries) for queries, _ in union if len(queries)) > 16
    for (queries, gts), (ref_queries, ref_gts) in zip(union, expected, strict=True):
        assert queries.tolist() == ref_queries.tolist() and gts.tolist() == ref_gts.tolist()


def test_teacher_check_by_value_agrees_with_torch_equal():
    from deim_lib.criterion.deim_criterion import _differs

    corners = torch.randn(2, 5, 12)
    nan = corners.clone()
    nan[0, 0, 0] = math.nan
    other = corners.clone()
    other[1, 4, 11] += 1e-6
    for teacher in (corners, corners.clone(), nan, other, corners[:, :4]):
        assert _differs(corners, teacher).item() == (not torch.equal(corners, teacher))
    assert _differs(nan, nan.clone()).item()
