"""ViT-Tiny, DINOv3 ViT-S/16(+), their RoPE and the DINOv3STAs adapter against the official DEIMv2 facts."""

import math
from pathlib import Path

import pytest
import torch

from deim_lib.backbone.dinov3_adapter import DINOv3STAs
from deim_lib.backbone.dinov3_vit import DINOv3ViT
from deim_lib.backbone.rope import RopePositionEmbedding, apply_rope, apply_rope_to_patches

HEAD_DIM = 64


def make_s_backbone() -> DINOv3STAs:
    return DINOv3STAs("vit_tiny", [3, 7, 11], 16, 192, embed_dim=192, num_heads=3)


def set_dinov3_bias_mask(model: torch.nn.Module) -> None:
    """The mask of the official DINOv3 weights: q and v biases on, k bias off."""
    for name, buffer in model.named_buffers():
        if name.endswith("bias_mask"):
            third = buffer.numel() // 3
            buffer.copy_(torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)]))


@pytest.fixture(scope="module")
def s_reference(reference_dir: Path) -> tuple[DINOv3STAs, dict]:
    """S backbone loaded strictly from the float32 upcast of the EMA weights (eval mode), and the io dict."""
    ema = torch.load(reference_dir / "deimv2_s_c6.pth", weights_only=True)["ema"]["module"]
    state = {
        key.removeprefix("backbone."): value.float() if value.is_floating_point() else value
        for key, value in ema.items()
        if key.startswith("backbone.")
    }
    model = make_s_backbone()
    model.load_state_dict(state, strict=True)
    io = torch.load(reference_dir / "deimv2_s_c6_io.pt", weights_only=True)
    return model.eval(), io


def test_s_backbone_keys_shapes_and_kinds_match_official_listing(reference_dir: Path) -> None:
    official = []
    for line in (reference_dir / "deimv2_keys_S.txt").read_text().splitlines():
        if line.startswith("backbone."):
            key, shape, dtype, kind = line.split("\t")
            official.append((key.removeprefix("backbone."), shape, dtype, kind))
    model = make_s_backbone()
    parameters = dict(model.named_parameters())
    ours = [
        (
            key,
            str(list(value.shape)),
            str(value.dtype).removeprefix("torch."),
            "param" if key in parameters else "buffer",
        )
        for key, value in model.state_dict().items()
    ]
    assert len(official) == 190
    assert ours == official
    assert model.out_channels == [192, 192, 192]


def test_s_backbone_matches_official_outputs(s_reference: tuple[DINOv3STAs, dict]) -> None:
    model, io = s_reference
    with torch.no_grad():
        outputs = model(io["pixel_values"])
    expected_levels = io["debug"]["backbone_outputs"]
    assert len(outputs) == len(expected_levels) == 3
    for output, expected in zip(outputs, expected_levels, strict=True):
        assert list(output.shape) == expected["shape"]
        values = output.double()
        assert values.mean().item() == pytest.approx(expected["mean"], rel=1e-5, abs=1e-7)
        assert values.abs().mean().item() == pytest.approx(expected["abs_mean"], rel=1e-5)
        assert values.std().item() == pytest.approx(expected["std"], rel=1e-5)
        torch.testing.assert_close(output.flatten()[:8], torch.tensor(expected["first8"]), rtol=0, atol=1e-4)


def test_rope_periods_are_powers_of_100_and_match_checkpoint(reference_dir: Path) -> None:
    periods = RopePositionEmbedding(HEAD_DIM).periods
    expected = torch.tensor([100 ** (k / 16) for k in range(16)], dtype=torch.float64)
    assert periods.dtype == torch.float32
    torch.testing.assert_close(periods.double(), expected, rtol=1e-6, atol=0)
    ema = torch.load(reference_dir / "deimv2_s_c6.pth", weights_only=True)["ema"]["module"]
    assert torch.equal(periods, ema["backbone.dinov3._model.rope_embed.periods"])


def test_rope_tables_layout_is_y_angles_then_x_angles_tiled_twice() -> None:
    height, width = 3, 5  # non-square: rows are normalised by the height, columns by the width
    sin, cos = RopePositionEmbedding(HEAD_DIM).eval()(height, width)
    assert sin.shape == cos.shape == (height * width, HEAD_DIM)
    periods = torch.tensor([100 ** (k / 16) for k in range(16)], dtype=torch.float64)
    for token in (0, 7, 14):
        row, col = divmod(token, width)
        y = 2 * (row + 0.5) / height - 1
        x = 2 * (col + 0.5) / width - 1
        half = torch.cat([2 * math.pi * y / periods, 2 * math.pi * x / periods])
        angles = torch.cat([half, half])
        torch.testing.assert_close(sin[token].double(), angles.sin(), rtol=0, atol=1e-6)
        torch.testing.assert_close(cos[token].double(), angles.cos(), rtol=0, atol=1e-6)


def test_rope_rotates_channel_k_with_channel_k_plus_half() -> None:
    sin, cos = RopePositionEmbedding(HEAD_DIM).eval()(2, 2)
    unit = torch.zeros(4, HEAD_DIM)
    unit[:, 3] = 1.0
    rotated = apply_rope(unit, sin, cos)
    torch.testing.assert_close(rotated[:, 3], cos[:, 3])
    torch.testing.assert_close(rotated[:, 3 + HEAD_DIM // 2], sin[:, 3])
    assert rotated.count_nonzero(dim=-1).max() == 2
    torch.testing.assert_close(rotated.norm(dim=-1), torch.ones(4))


def test_rope_leaves_prefix_tokens_untouched() -> None:
    sin, cos = RopePositionEmbedding(HEAD_DIM).eval()(4, 4)
    queries = torch.randn(2, 3, 5 + 16, HEAD_DIM)
    rotated = apply_rope_to_patches(queries, sin, cos, num_prefix_tokens=5)
    assert torch.equal(rotated[:, :, :5], queries[:, :, :5])
    torch.testing.assert_close(rotated[:, :, 5:], apply_rope(queries[:, :, 5:], sin, cos))


def test_rope_rescale_augments_only_in_training() -> None:
    rope = RopePositionEmbedding(HEAD_DIM, rescale_coords=2.0)
    plain = RopePositionEmbedding(HEAD_DIM).train()(4, 4)  # no rescale configured: training changes nothing
    assert all(torch.equal(a, b) for a, b in zip(rope.eval()(4, 4), plain, strict=True))
    torch.manual_seed(0)
    first = rope.train()(4, 4)
    second = rope(4, 4)
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize(
    ("name", "conv_inplane", "hidden", "vit_params", "adapter_params", "state_entries"),
    [
        # ViT-S/16 = 21.6 M and ViT-S+/16 = 28.7 M, the published DINOv3 sizes. Entry counts: DEIMv2-L has 809 and the
        # M model 769 state-dict entries with identical encoder/decoder layouts, so L's backbone has 809 − (769 − 190).
        ("dinov3_vits16", 32, 224, 21_601_152, 572_256, 230),
        ("dinov3_vits16plus", 64, 256, 28_697_472, 1_421_888, 254),
    ],
)
def test_dinov3_backbones_sizes_nan_until_loaded_and_shapes(
    name: str, conv_inplane: int, hidden: int, vit_params: int, adapter_params: int, state_entries: int
) -> None:
    model = DINOv3STAs(name, [5, 8, 11], conv_inplane, hidden).eval()
    vit_count = sum(p.numel() for p in model.dinov3.parameters())
    assert vit_count == vit_params
    assert sum(p.numel() for p in model.parameters()) - vit_count == adapter_params
    assert len(model.state_dict()) == state_entries
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(level.isnan().all() for level in model(images))
        set_dinov3_bias_mask(model)
        outputs = model(images)
    assert [tuple(level.shape) for level in outputs] == [(1, hidden, 8, 8), (1, hidden, 4, 4), (1, hidden, 2, 2)]
    assert all(level.isfinite().all() for level in outputs)


def test_dinov3_rope_draws_one_rescale_per_block_in_training() -> None:
    vit = DINOv3ViT(depth=3)
    set_dinov3_bias_mask(vit)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        vit.train()
        torch.manual_seed(1)
        first = vit.get_intermediate_layers(images, [2])[0]
        state_after_forward = torch.get_rng_state()
        torch.manual_seed(1)
        for _ in range(3):
            torch.empty(1).uniform_()
        assert torch.equal(state_after_forward, torch.get_rng_state())
        torch.manual_seed(2)
        second = vit.get_intermediate_layers(images, [2])[0]
        vit.eval()
        evaluated = [vit.get_intermediate_layers(images, [2])[0] for _ in range(2)]
    assert not torch.allclose(first, second)
    assert torch.equal(evaluated[0], evaluated[1])


def test_vit_tiny_has_no_training_augmentation() -> None:
    vit = make_s_backbone().dinov3
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        trained = vit.train().get_intermediate_layers(images, [11])[0]
        torch.manual_seed(2)
        evaluated = vit.eval().get_intermediate_layers(images, [11])[0]
    assert torch.equal(trained, evaluated)


def test_load_pretrained_fills_vit_tiny_container_and_names_bad_keys(tmp_path: Path) -> None:
    source = make_s_backbone()
    good = tmp_path / "vitt_distill.pt"
    torch.save({"model": source.dinov3._model.state_dict()}, good)
    target = make_s_backbone()
    target.load_pretrained(good)
    assert torch.equal(target.dinov3._model.cls_token, source.dinov3._model.cls_token)
    assert torch.equal(target.dinov3._model.blocks[5].mlp.fc2.weight, source.dinov3._model.blocks[5].mlp.fc2.weight)

    bad_state = source.dinov3._model.state_dict()
    bad_state["cls_token"] = torch.zeros(1, 1, 256)
    del bad_state["blocks.0.norm1.bias"]
    bad = tmp_path / "wrong.pt"
    torch.save(bad_state, bad)
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing \['blocks\.0\.norm1\.bias'\].*mismatch \['cls_token'\]"):
        target.load_pretrained(bad)


def test_load_pretrained_restores_dinov3_bias_mask(tmp_path: Path) -> None:
    source = DINOv3STAs("dinov3_vits16", [5, 8, 11], 32, 224)
    set_dinov3_bias_mask(source.dinov3)
    path = tmp_path / "dinov3_vits16.pth"
    torch.save(source.dinov3.state_dict(), path)
    target = DINOv3STAs("dinov3_vits16", [5, 8, 11], 32, 224)
    target.load_pretrained(path)
    assert torch.equal(target.dinov3.blocks[11].attn.qkv.bias_mask, source.dinov3.blocks[11].attn.qkv.bias_mask)


def test_unknown_backbone_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="dinov3_vits16plus"):
        DINOv3STAs("vit_huge", [3, 7, 11], 16)
