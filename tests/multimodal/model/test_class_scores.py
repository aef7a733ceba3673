"""Class scores from the text: an exact start, known classes untouched when classes are added (by name, or as the
first K for a file without names), text rows against random rows, and a description that steers its own class only."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deim_lib import build_detector
from deim_lib.variants import get_variant
from multimodal.config import ConfigError, FusionConfig
from multimodal.model.assemble import REDUCE_KEY, ModelSpec, Weights, assemble_model, checkpoint_spec
from multimodal.model.class_scores import ClassTexts, fit
from multimodal.model.detector import split_state
from multimodal.model.text_encoder import TextEmbeddings

NAMES = ["crack", "dent", "rust", "scratch", "pit"]
SIZE = 160


def text_of(names: list[str], dim: int = 32, seed: int = 0) -> TextEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    table = {name: F.normalize(torch.randn(dim, generator=generator), dim=0) for name in sorted([*NAMES, "hole"])}
    return TextEmbeddings(torch.stack([table[name] for name in names]), list(names), {}, "test")


def trained_detector(num_classes: int) -> dict:
    """A detector state with distinct, non-initial score rows (as a converged detector has)."""
    torch.manual_seed(1)
    detector = build_detector("atto", num_classes, eval_size=(SIZE, SIZE))
    with torch.no_grad():
        for name, value in detector.named_parameters():
            if "score_head" in name:
                value.normal_(0, 0.5)
    return detector.state_dict()


def head_logits(model, features):
    """Every score head's logits for the same query features, stacked: [heads, ..., K]."""
    decoder = model.detector.decoder
    with torch.no_grad():
        return torch.stack([head(features) for head in (decoder.enc_score_head, *decoder.dec_score_head)])


def spec(names, **changes) -> ModelSpec:
    fields = {"text": text_of(names), "fusion": FusionConfig(num_heads=4), "class_scores": "text"} | changes
    return ModelSpec(get_variant("atto"), list(names), SIZE, **fields)


def test_fitting_a_trained_head_is_exact_when_the_classes_fit_the_text_width():
    head = torch.nn.Linear(64, 6)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    texts = ClassTexts(F.normalize(torch.randn(6, 16), dim=-1))
    scores, residual = fit(head, texts, torch.arange(6))
    queries = torch.randn(3, 10, 64)
    assert residual < 1e-6
    torch.testing.assert_close(scores(queries), head(queries), atol=1e-5, rtol=1e-5)
    # More classes than the text width allows: least squares, and the residual says how far off it is.
    wide = torch.nn.Linear(64, 20)
    _, residual = fit(wide, ClassTexts(F.normalize(torch.randn(20, 8), dim=-1)), torch.arange(20))
    assert residual > 0.1


def test_the_real_detector_scoring_from_clip_text_starts_with_its_official_outputs(real_atto, coco_clip, datasets_dir):
    """On real images (a random detector's encoder ties many anchors, so its query order is no test)."""
    from PIL import Image

    from deim_lib.checkpoint import detector_state_dict, read_checkpoint
    from deim_lib.data.transforms import build_val_transforms

    state, _ = detector_state_dict(read_checkpoint(real_atto), real_atto)
    rows = torch.from_numpy(np.load(coco_clip)).float()
    names = [f"class {k}" for k in range(80)]
    text = TextEmbeddings(F.normalize(rows, dim=-1), names, {}, "clip")
    images = sorted((datasets_dir / "coco-tiny" / "val2017").glob("*.jpg"))[:2]
    batch = torch.stack([build_val_transforms(320, None)(Image.open(path).convert("RGB"), {})[0] for path in images])
    built = {
        scores: assemble_model(
            ModelSpec(get_variant("atto"), names, 320, text, FusionConfig(), class_scores=scores),
            Weights("atto", state),
        ).model.eval()
        for scores in ("linear", "text")
    }
    with torch.no_grad():
        linear, from_text = (built[scores](batch)["pred_logits"] for scores in ("linear", "text"))
    torch.testing.assert_close(from_text, linear, atol=1e-4, rtol=1e-4)


def test_added_classes_leave_the_known_classes_scores_unchanged_and_text_differs_from_random():
    known, features = NAMES[:3], torch.randn(2, 30, 64)
    state = trained_detector(len(known))
    base = head_logits(assemble_model(spec(known, class_scores="linear"), Weights("base.pth", state)).model, features)
    # An official file has no names: its 3 classes are the dataset's first 3, and the log says so.
    by_text = assemble_model(spec(NAMES, new_classes="text"), Weights("base.pth", state))
    assert by_text.added == ["scratch", "pit"] and "first 3 categories" in by_text.notes[0]
    torch.manual_seed(0)
    by_random = assemble_model(spec(NAMES, class_scores="linear", new_classes="random"), Weights("base.pth", state))
    text_logits, random_logits = head_logits(by_text.model, features), head_logits(by_random.model, features)
    assert text_logits.shape[-1] == len(NAMES)
    torch.testing.assert_close(text_logits[..., :3], base, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(random_logits[..., :3], base, atol=2e-5, rtol=1e-5)
    assert (text_logits[..., 3:] - random_logits[..., 3:]).abs().max() > 0.1


def test_known_classes_are_matched_by_name_wherever_they_sit_in_the_dataset():
    state, features = trained_detector(3), torch.randn(1, 30, 64)
    stored = ["rust", "crack", "dent"]
    linear = assemble_model(spec(stored, class_scores="linear"), Weights("p.pth", state, None, stored)).model
    base = head_logits(linear, features)
    grown = assemble_model(spec(NAMES, new_classes="text"), Weights("p.pth", state, None, stored))
    logits = head_logits(grown.model, features)
    assert grown.added == ["scratch", "pit"] and not grown.notes
    torch.testing.assert_close(logits[..., [2, 0, 1]], base, atol=2e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"its classes \['rust', 'crack', 'dent'\] differ .* model.new_classes"):
        assemble_model(spec(NAMES), Weights("p.pth", state, None, stored))
    with pytest.raises(ConfigError, match="must describe the classes the checkpoint was trained on"):
        assemble_model(spec(["crack", "dent", "hole"], new_classes="text"), Weights("p.pth", state, None, stored))


def test_editing_a_description_changes_that_class_scores_only():
    state, features = trained_detector(3), torch.randn(1, 30, 64)
    model = assemble_model(spec(NAMES, new_classes="text"), Weights("base.pth", state)).model
    before = head_logits(model, features)
    edited = model.text_embeddings.clone()
    edited[4] = F.normalize(torch.randn(32), dim=0)  # "pit" described otherwise
    model.text_embeddings = edited
    after = head_logits(model, features)
    torch.testing.assert_close(after[..., :4], before[..., :4], atol=0, rtol=0)
    assert (after[..., 4] - before[..., 4]).abs().max() > 1e-3


def test_phase_zero_keeps_linear_heads_and_cannot_compose_new_classes():
    state = trained_detector(3)
    phase_zero = assemble_model(spec(NAMES[:3], text=None), Weights("base.pth", state)).model
    assert not phase_zero.scores_from_text  # the heads are fitted when phase 1 attaches the text
    with pytest.raises(ConfigError, match="phase 0 does not use"):
        assemble_model(spec(NAMES, text=None, new_classes="text"), Weights("base.pth", state))


def test_a_fit_that_cannot_be_exact_is_said_in_the_notes():
    state = trained_detector(len(NAMES))
    exact = assemble_model(spec(NAMES), Weights("base.pth", state))
    narrow = assemble_model(spec(NAMES, text=text_of(NAMES, dim=2)), Weights("base.pth", state))
    assert not exact.notes
    assert "least squares with a relative residual" in narrow.notes[0]


def test_text_initialised_free_rows_start_as_the_shared_map_scores():
    """new_classes: text with class_scores: linear: ordinary DEIMv2 rows, composed by the texts, that train freely."""
    state, features = trained_detector(3), torch.randn(1, 30, 64)
    shared = assemble_model(spec(NAMES, new_classes="text"), Weights("base.pth", state)).model
    rows = assemble_model(spec(NAMES, class_scores="linear", new_classes="text"), Weights("base.pth", state)).model
    assert shared.scores_from_text and not rows.scores_from_text
    # Plain DEIMv2 rows: the detector's keys and shapes are an official 5-class detector's.
    official = build_detector("atto", len(NAMES), eval_size=(SIZE, SIZE)).state_dict()
    assert {k: v.shape for k, v in rows.detector.state_dict().items()} == {k: v.shape for k, v in official.items()}
    torch.testing.assert_close(head_logits(rows, features), head_logits(shared, features), atol=1e-4, rtol=1e-4)


def test_a_shared_map_of_lower_rank_is_exact_down_to_k_minus_one_and_rebuilds_with_its_rank():
    state, features = trained_detector(len(NAMES)), torch.randn(1, 30, 64)
    base = head_logits(assemble_model(spec(NAMES, class_scores="linear"), Weights("b", state)).model, features)
    exact = assemble_model(spec(NAMES, text_map_rank=len(NAMES) - 1), Weights("b", state))
    assert not exact.notes  # K − 1 is the rank of the exact map: nothing is lost
    torch.testing.assert_close(head_logits(exact.model, features), base, atol=1e-4, rtol=1e-4)
    low = assemble_model(spec(NAMES, text_map_rank=2), Weights("b", state))
    assert "least squares with a relative residual" in low.notes[0]
    detector, fusion = split_state(low.model.state_dict())
    assert detector[REDUCE_KEY].shape == (2, 64)
    # A checkpoint of it is rebuilt with the same factors, read from its weights.
    info = SimpleNamespace(variant="atto", class_names=NAMES, image_size=SIZE, config={"fusion": {"num_heads": 4}})
    stored = SimpleNamespace(info=info, weights=lambda: (detector, fusion), text_embeddings=text_of(NAMES).to_dict())
    rebuilt = assemble_model(checkpoint_spec(stored, "p.pth"), Weights("p.pth", detector, fusion, list(NAMES))).model
    torch.testing.assert_close(head_logits(rebuilt, features), head_logits(low.model, features), atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"model\.text_map_rank: 33 exceeds the rank a map from the queries"):
        assemble_model(spec(NAMES, text_map_rank=33), Weights("b", state))  # the texts are 32 wide
