"""Whether the text is used: the added-signal ratio and the text-reliance evaluation."""

import math

import torch
import torch.nn.functional as F

from deim_lib import build_detector
from multimodal.model.detector import MultimodalDetector, attach_text
from multimodal.model.text_usage import AddedSignal, derangement, evaluate_with_text, replaced_text, text_reliance


def model_with_text(opened: bool):
    torch.manual_seed(0)
    model = attach_text(build_detector("atto", 4, eval_size=(160, 160)), F.normalize(torch.randn(4, 16), dim=-1))
    if opened:
        with torch.no_grad():
            for level in model.fusion.levels:
                level.output.weight.normal_()
    return model.eval()


def test_derangement_moves_every_class_and_is_fixed():
    for count in (2, 5, 80):
        order = derangement(count)
        assert sorted(order.tolist()) == list(range(count)) and not (order == torch.arange(count)).any()
        assert torch.equal(order, derangement(count))


def test_added_signal_is_zero_for_a_fresh_fusion_and_the_feature_ratio_once_open():
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    fresh = model_with_text(opened=False)
    with AddedSignal(fresh) as signal, torch.no_grad():
        fresh(images)
    assert signal.ratios() == [0.0, 0.0] and signal.classifier_bias_rms() is None

    opened = model_with_text(opened=True)
    with torch.no_grad():
        feats = opened.detector.encoder(opened.detector.backbone(images))
        fused = opened.fusion(feats, opened.text_embeddings)
        with AddedSignal(opened) as signal:
            opened(images)
    for ratio, before, after in zip(signal.ratios(), feats, fused, strict=True):
        assert math.isclose(ratio, float((after - before).norm() / before.norm()), rel_tol=1e-5)


def test_text_reliance_of_a_fresh_fusion_is_exactly_zero_and_the_text_comes_back():
    model = model_with_text(opened=False)
    images = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    text = model.text_embeddings.clone()

    def score() -> float:  # any function of the detections; a fresh fusion leaves them bit-identical
        with torch.no_grad():
            return float(model(images)["pred_logits"].sum())

    reliance = text_reliance(model, score(), score)
    assert reliance["permuted"] == 0.0 and reliance["mean"] == 0.0
    assert torch.equal(model.text_embeddings, text)
    with replaced_text(model, torch.zeros_like(text)):
        assert not model.text_embeddings.any()
    assert torch.equal(model.text_embeddings, text)


def test_evaluate_with_text_adds_the_measurements_only_for_a_text_model():
    plain = MultimodalDetector(build_detector("atto", 4, eval_size=(160, 160)))  # phase 0: no text yet
    assert evaluate_with_text(plain, lambda: {"AP": 0.5})["text"] == {}
    model = model_with_text(opened=True)
    result = evaluate_with_text(model, lambda: {"AP": 0.5}, reliance=True)
    assert set(result["text"]) == {"added_signal", "classifier_bias", "reliance"}
    assert result["text"]["reliance"]["permuted"] == 0.0  # the stand-in metric does not look at the model


def test_text_reliance_evaluates_the_deranged_and_the_mean_text_and_sees_an_opened_fusion_use_it():
    model = model_with_text(opened=True)
    images = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    text, seen = model.text_embeddings.clone(), []

    def score() -> float:
        seen.append(model.text_embeddings.clone())
        with torch.no_grad():
            return float(model(images)["pred_logits"].sum())

    reliance = text_reliance(model, score(), score)
    mean = F.normalize(text.mean(dim=0, keepdim=True), dim=-1).expand_as(text)
    assert torch.equal(seen[1], text[derangement(len(text))]) and torch.equal(seen[2], mean)
    assert reliance["mean"] != 0.0  # an opened fusion: the detections follow the text's content
    assert torch.equal(model.text_embeddings, text)
