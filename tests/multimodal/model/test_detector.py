"""MultimodalDetector: identical detections at init, fusion-only training, named parts, official key names."""

import pytest
import torch
import torch.nn.functional as F

from deim_lib.checkpoint import CheckpointError, load_official_checkpoint
from deim_lib.model import build_detector
from multimodal.model.class_scores import ClassTexts
from multimodal.model.detector import MultimodalDetector, attach_text, load_weights, split_state
from multimodal.model.text_encoder import load_precomputed

TEXT_DIM = 32
# Encoder output channels per level (fine → coarse) of the released variants.
ENCODER_WIDTHS = {
    "atto": [64, 64],
    "femto": [96, 96],
    "pico": [112, 112],
    "n": [128, 128],
    "s": [192] * 3,
    "m": [256] * 3,
    "l": [224] * 3,
    "x": [256] * 3,
}


def random_text(num_classes: int, text_dim: int = TEXT_DIM) -> torch.Tensor:
    return F.normalize(torch.randn(num_classes, text_dim, generator=torch.Generator().manual_seed(1)), dim=-1)


def build_model(variant: str, text: torch.Tensor, eval_size: tuple[int, int] | None = None) -> MultimodalDetector:
    """A random ``variant`` detector for ``len(text)`` classes with fusion and the text-aware classifier."""
    return attach_text(
        build_detector(variant, text.shape[0], eval_size=eval_size), text, text_aware_classification=True
    )


def reference_model(variant: str, request: pytest.FixtureRequest) -> tuple[MultimodalDetector, torch.Tensor]:
    """Official 6-class reference weights (float16 upcast to the model's float32) and the first reference image."""
    reference_dir = request.getfixturevalue("reference_dir")
    torch.manual_seed(0)
    model = build_model(variant, random_text(6))
    model.detector.load_state_dict(load_official_checkpoint(reference_dir / f"deimv2_{variant}_c6.pth"), strict=True)
    images = torch.load(reference_dir / f"deimv2_{variant}_c6_io.pt", weights_only=True)["pixel_values"][:1]
    return model.eval(), images


def random_model(variant: str, request: pytest.FixtureRequest) -> tuple[MultimodalDetector, torch.Tensor]:
    """Random weights at a small input; atto carries the 80 real COCO CLIP embeddings as its classes."""
    torch.manual_seed(0)
    if variant == "atto":
        names = [f"class {k}" for k in range(80)]
        text = load_precomputed(request.getfixturevalue("coco_clip"), names).embeddings
    else:
        text = random_text(5)
    model = build_model(variant, text, eval_size=(160, 160))
    return model.eval(), torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))


def set_dinov3_bias_mask(model: torch.nn.Module) -> None:
    """What the official DINOv3 weights hold: qkv bias on for the q and v thirds, off for k."""
    for name, buffer in model.named_buffers():
        if name.endswith("bias_mask"):
            third = buffer.numel() // 3
            buffer.fill_(1.0)
            buffer[third : 2 * third] = 0.0


def assert_same_outputs(ours: dict, base: dict) -> None:
    for key in ("pred_logits", "pred_boxes"):
        assert ours[key].shape == base[key].shape
        assert torch.equal(ours[key], base[key]), f"{key}: max |Δ| {(ours[key] - base[key]).abs().max():.3g}"


@pytest.mark.parametrize(
    ("variant", "make_model"),
    [("atto", reference_model), ("s", reference_model), ("atto", random_model), ("s", random_model)],
    ids=["atto-reference", "s-reference", "atto-random-coco-clip", "s-random"],
)
def test_detections_equal_the_base_detector_at_init_with_and_without_text_classifier(variant, make_model, request):
    model, images = make_model(variant, request)
    with torch.no_grad():
        base = model.detector(images)
        with_classifier = model(images)
        classifier, model.text_classifier = model.text_classifier, None
        fusion_only = model(images)
        model.text_classifier = classifier
    assert base["pred_logits"].shape[-1] == model.text_embeddings.shape[0]
    assert torch.isfinite(base["pred_logits"]).all()
    assert_same_outputs(with_classifier, base)
    assert_same_outputs(fusion_only, base)


def test_training_forward_with_denoising_equals_the_base_detector_at_init(request, reference_dir):
    model, _ = reference_model("atto", request)
    io = torch.load(reference_dir / "deimv2_atto_c6_io.pt", weights_only=True)
    model.train()
    outputs = {}
    for name, forward in (("base", model.detector), ("ours", model)):
        torch.manual_seed(5)  # the same denoising noise for both
        with torch.no_grad():
            outputs[name] = forward(io["pixel_values"], io["targets"])
    base, ours = outputs["base"], outputs["ours"]
    assert "dn_outputs" in ours and ours["dn_outputs"][-1]["pred_logits"].shape[-1] == 6
    assert_same_outputs(ours, base)
    assert_same_outputs(ours["dn_outputs"][-1], base["dn_outputs"][-1])
    assert_same_outputs(ours["pre_outputs"], base["pre_outputs"])


def test_one_adamw_step_on_fusion_changes_outputs_and_no_detector_tensor(request):
    model, images = reference_model("atto", request)
    model.detector.requires_grad_(False)
    before = {key: value.clone() for key, value in model.detector.state_dict().items()}
    trainable = [p for part in model.parts()["fusion"] for p in part.parameters()]
    assert len(trainable) == sum(1 for _ in model.fusion.parameters()) + 1  # + the classifier's projection
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    outputs = model(images)
    (outputs["pred_logits"].sigmoid().mean() + outputs["pred_boxes"].mean()).backward()
    optimizer.step()

    with torch.no_grad():
        after = model(images)
    assert (after["pred_logits"] - outputs["pred_logits"]).abs().max() > 1e-4
    assert (after["pred_boxes"] - outputs["pred_boxes"]).abs().max() > 0
    assert all(torch.count_nonzero(level.output.weight) for level in model.fusion.levels)
    assert torch.count_nonzero(model.text_classifier.query_proj.weight)
    changed = [key for key, value in model.detector.state_dict().items() if not torch.equal(value, before[key])]
    assert changed == []


def test_state_dict_keeps_official_detector_keys_and_leaves_out_the_text(reference_dir):
    with torch.device("meta"):
        model = build_model("atto", random_text(6))
    official = load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth")
    assert set(model.detector.state_dict()) == set(official)
    own = set(model.state_dict())
    assert {key.removeprefix("detector.") for key in own if key.startswith("detector.")} == set(official)
    assert {key.split(".")[0] for key in own} == {"detector", "fusion", "text_classifier"}
    assert "texts.embeddings" in dict(model.named_buffers())  # one buffer, shared by every module reading the text


def test_parts_name_the_modules_of_each_training_phase():
    with torch.device("meta"):
        model = build_model("s", random_text(3))
    parts, decoder = model.parts(), model.detector.decoder
    assert parts["backbone"] == [model.detector.backbone] and parts["encoder"] == [model.detector.encoder]
    assert parts["decoder"] == [decoder]
    assert parts["class_heads"] == [decoder.enc_score_head, decoder.dec_score_head]
    assert parts["box_heads"] == [decoder.enc_bbox_head, decoder.pre_bbox_head, decoder.dec_bbox_head]
    assert parts["fusion"] == [model.fusion, model.text_classifier]
    without_text = MultimodalDetector(model.detector)  # phase 0: the same parts, no fusion
    assert without_text.parts() == {name: modules for name, modules in parts.items() if name != "fusion"}


def test_without_text_the_model_is_the_detector_itself():
    torch.manual_seed(0)
    detector = build_detector("atto", 3, eval_size=(160, 160)).eval()
    model = MultimodalDetector(detector)
    images = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        expected, got = detector(images), model(images)
    assert not model.uses_text and set(model.state_dict()) == {f"detector.{key}" for key in detector.state_dict()}
    assert torch.equal(expected["pred_logits"], got["pred_logits"])
    assert torch.equal(expected["pred_boxes"], got["pred_boxes"])
    with pytest.raises(ValueError, match="a fusion module needs text embeddings"):
        MultimodalDetector(detector, texts=ClassTexts(random_text(3)))


def test_split_state_gives_official_detector_keys_and_load_weights_restores_both_halves(reference_dir):
    torch.manual_seed(0)
    trained = build_model("atto", random_text(6))
    with torch.no_grad():
        trained.fusion.levels[0].output.weight.fill_(0.5)
        trained.text_classifier.query_proj.weight.fill_(2.0)
    detector_state, fusion_state = split_state(trained.state_dict())
    assert set(detector_state) == set(load_official_checkpoint(reference_dir / "deimv2_atto_c6.pth"))
    assert set(fusion_state) == {key for key in trained.state_dict() if key.startswith(("fusion.", "text_classifier."))}
    bare_detector, bare_fusion = split_state(trained.detector.state_dict())  # a DEIM without text: all detector
    assert bare_fusion == {} and list(bare_detector) == list(trained.detector.state_dict())

    torch.manual_seed(1)
    fresh = build_model("atto", random_text(6))
    load_weights(fresh, detector_state, fusion_state, "test")
    assert all(torch.equal(value, trained.state_dict()[key]) for key, value in fresh.state_dict().items())


def test_load_weights_names_the_keys_that_do_not_fit():
    with torch.device("meta"):
        model = build_model("atto", random_text(6))
        without_classifier = attach_text(build_detector("atto", 6), random_text(6))
    detector_state, fusion_state = split_state(model.state_dict())
    with pytest.raises(CheckpointError, match=r"src: the fusion weights .*unexpected \['text_classifier.query_proj"):
        load_weights(without_classifier, None, fusion_state, "src")
    with pytest.raises(CheckpointError, match="src: holds text-fusion weights"):
        load_weights(MultimodalDetector(without_classifier.detector), detector_state, fusion_state, "src")
    del detector_state["decoder.enc_score_head.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['decoder.enc_score_head.bias'\]"):
        load_weights(model, detector_state, None, "src")


def test_text_rows_must_match_the_class_count():
    model = attach_text(build_detector("atto", 4), random_text(4))
    assert model.text_classifier is None and model.parts()["fusion"] == [model.fusion]
    with pytest.raises(ValueError, match="4 classes"):
        MultimodalDetector(model.detector, model.fusion, ClassTexts(random_text(5)))


@pytest.mark.parametrize("variant", list(ENCODER_WIDTHS))
def test_every_released_variant_builds_with_fusion_at_the_encoder_width(variant):
    with torch.device("meta"):
        model = build_model(variant, random_text(7))
    assert [level.text_proj.out_features for level in model.fusion.levels] == ENCODER_WIDTHS[variant]
    assert [level.num_heads for level in model.fusion.levels] == [8] * len(ENCODER_WIDTHS[variant])
    assert model.text_classifier.query_proj.in_features == model.detector.decoder.hidden_dim


@pytest.mark.parametrize(("variant", "size"), [("n", 320), ("l", 160)])
def test_small_forward_of_n_and_l_equals_the_base_detector(variant, size):
    torch.manual_seed(0)
    model = build_model(variant, random_text(3), eval_size=(size, size)).eval()
    set_dinov3_bias_mask(model)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base, ours = model.detector(images), model(images)
    assert ours["pred_logits"].shape == (1, 300, 3) and torch.isfinite(ours["pred_logits"]).all()
    assert_same_outputs(ours, base)
