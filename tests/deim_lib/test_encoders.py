"""HybridEncoder and LiteEncoder: official key layout, reference statistics, deploy fusion, positional embedding."""

import copy
import math

import pytest
import torch
from torch import nn

from deim_lib.backbone.hgnetv2 import HGNetv2
from deim_lib.encoder.hybrid_encoder import HybridEncoder, build_2d_sincos_position_embedding
from deim_lib.encoder.lite_encoder import LiteEncoder
from tests.deim_lib.test_hgnetv2 import assert_matches_reference_stats, official_entries, official_weights


def atto_encoder() -> LiteEncoder:
    return LiteEncoder([256], [16], hidden_dim=64, expansion=0.34, depth_mult=0.5, eval_spatial_size=(320, 320))


def s_encoder(eval_spatial_size: tuple[int, int] | None = (640, 640)) -> HybridEncoder:
    return HybridEncoder(
        [192, 192, 192],
        [8, 16, 32],
        hidden_dim=192,
        dim_feedforward=512,
        expansion=0.34,
        depth_mult=0.67,
        version="deim",
        eval_spatial_size=eval_spatial_size,
    )


def n_encoder() -> HybridEncoder:
    """HGNetv2-N's encoder: two levels, input projections and RepNCSPELAN4 ("dfine") fuse blocks."""
    return HybridEncoder([512, 1024], [16, 32], 128, 512, 0.34, 0.5, "dfine", eval_spatial_size=(320, 320))


def keys_and_shapes(module: nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in module.state_dict().items()]


def randomise_batchnorm_statistics(module: nn.Module) -> None:
    """Make BN folding non-trivial for freshly built modules."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def atto_io(reference_dir):
    return torch.load(reference_dir / "deimv2_atto_c6_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def atto_features(reference_dir, atto_io) -> list[torch.Tensor]:
    backbone = HGNetv2("Atto", [2], use_lab=True)
    backbone.load_state_dict(official_weights(reference_dir, "atto", "backbone."), strict=True)
    with torch.no_grad():
        return backbone.eval()(atto_io["pixel_values"])


def test_lite_encoder_keys_shapes_and_parameter_count_equal_official_atto_listing(reference_dir):
    entries = official_entries(reference_dir, "atto", "encoder.")
    encoder = atto_encoder()
    assert keys_and_shapes(encoder) == [(key, shape) for key, shape, _ in entries]
    expected = sum(torch.Size(shape).numel() for _, shape, kind in entries if kind == "param")
    assert sum(p.numel() for p in encoder.parameters()) == expected == 80_400


def test_hybrid_encoder_keys_shapes_and_parameter_count_equal_official_s_listing(reference_dir):
    entries = official_entries(reference_dir, "S", "encoder.")
    encoder = s_encoder()
    # No positional-embedding entry: it is recomputed, not stored.
    assert keys_and_shapes(encoder) == [(key, shape) for key, shape, _ in entries]
    expected = sum(torch.Size(shape).numel() for _, shape, kind in entries if kind == "param")
    assert sum(p.numel() for p in encoder.parameters()) == expected == 1_367_360


@pytest.mark.parametrize(
    ("hidden_dim", "expansion", "depth_mult", "c4", "num_blocks"),
    [(64, 0.34, 0.5, 10, 2), (112, 0.34, 0.5, 19, 2), (256, 0.67, 1.0, 85, 3), (256, 1.25, 1.37, 160, 4)],
)
def test_fuse_block_width_and_depth_use_floor_then_bankers_rounding(hidden_dim, expansion, depth_mult, c4, num_blocks):
    with torch.device("meta"):
        encoder = LiteEncoder([256], [16], hidden_dim, expansion, depth_mult, eval_spatial_size=None)
    csp = encoder.fpn_block.cv2[0]
    assert csp.conv1.conv.out_channels == 2 * c4
    assert len(csp.bottlenecks) == num_blocks


def test_dfine_version_adds_a_trailing_conv_after_each_csp_stack_and_deim_does_not():
    dfine_keys = n_encoder().state_dict().keys()
    assert "fpn_blocks.0.cv2.1.conv.weight" in dfine_keys and "pan_blocks.0.cv3.1.conv.weight" in dfine_keys
    assert "input_proj.1.conv.weight" in dfine_keys
    assert not any(".cv2.1." in key or ".cv3.1." in key for key in s_encoder().state_dict())


def test_atto_lite_encoder_matches_reference_statistics(reference_dir, atto_io, atto_features):
    encoder = atto_encoder()
    encoder.load_state_dict(official_weights(reference_dir, "atto", "encoder."), strict=True)
    with torch.no_grad():
        outputs = encoder.eval()(atto_features)
    assert_matches_reference_stats(outputs, atto_io["debug"]["encoder_outputs"])


def test_s_hybrid_encoder_matches_reference_statistics(reference_dir):
    adapter = pytest.importorskip(
        "deim_lib.backbone.dinov3_adapter", reason="S backbone (deim_lib/backbone/dinov3_adapter.py) not available"
    )
    backbone = adapter.DINOv3STAs("vit_tiny", [3, 7, 11], conv_inplane=16)
    backbone.load_state_dict(official_weights(reference_dir, "s", "backbone."), strict=True)
    encoder = s_encoder()
    encoder.load_state_dict(official_weights(reference_dir, "s", "encoder."), strict=True)
    io = torch.load(reference_dir / "deimv2_s_c6_io.pt", weights_only=True)
    with torch.no_grad():
        outputs = encoder.eval()(backbone.eval()(io["pixel_values"]))
    assert_matches_reference_stats(outputs, io["debug"]["encoder_outputs"])


def assert_deploy_preserves_outputs(encoder: nn.Module, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deploy is exact up to rounding: float64 outputs within 1e-10; float32 max |Δ| ≤ 1e-5 · max |output| per level.

    The float32 margin is the reordered arithmetic of the folded layers (measured: max |Δ| ≤ 5.4e-5 at max |output|
    7.5–12 for the S encoder on random features, 2e-5 at 16.5 for Atto on the reference image features).
    """
    encoder.eval()
    encoder64 = copy.deepcopy(encoder).double()
    with torch.no_grad():
        before, before64 = encoder(feats), encoder64([f.double() for f in feats])
        encoder.convert_to_deploy()
        encoder.convert_to_deploy()  # idempotent: a detector-wide deploy may reach the blocks again
        encoder64.convert_to_deploy()
        after, after64 = encoder(feats), encoder64([f.double() for f in feats])
    for a, b in zip(after, before, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    for a, b in zip(after64, before64, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    state = encoder.state_dict()
    assert not any(".norm." in key for key in state if not key.startswith("input_proj."))
    assert not any(".conv1." in key or ".conv2." in key for key in state if ".bottlenecks." in key)
    return state


def test_lite_encoder_deploy_fuses_blocks_and_keeps_outputs(reference_dir, atto_features):
    encoder = atto_encoder()
    encoder.load_state_dict(official_weights(reference_dir, "atto", "encoder."), strict=True)
    state = assert_deploy_preserves_outputs(encoder, atto_features)
    assert list(state["bi_fusion.cv.conv_bn_fused.bias"].shape) == [64]
    assert list(state["fpn_block.cv2.0.bottlenecks.1.conv.weight"].shape) == [10, 10, 3, 3]
    assert "fpn_block.cv2.0.bottlenecks.1.conv.bias" in state


def test_hybrid_encoder_deploy_fuses_blocks_and_keeps_outputs(reference_dir):
    torch.manual_seed(0)
    encoder = s_encoder(eval_spatial_size=(128, 128))
    encoder.load_state_dict(official_weights(reference_dir, "s", "encoder."), strict=True)
    feats = [torch.randn(2, 192, 128 // s, 128 // s) for s in (8, 16, 32)]
    state = assert_deploy_preserves_outputs(encoder, feats)
    assert "lateral_convs.1.conv_bn_fused.weight" in state
    assert "downsample_convs.0.0.cv2.conv_bn_fused.bias" in state
    assert "pan_blocks.1.cv3.0.bottlenecks.0.conv.weight" in state


def test_dfine_hybrid_encoder_deploy_keeps_outputs():
    torch.manual_seed(0)
    encoder = n_encoder()
    randomise_batchnorm_statistics(encoder)
    state = assert_deploy_preserves_outputs(encoder, [torch.randn(1, 512, 20, 20), torch.randn(1, 1024, 10, 10)])
    assert "fpn_blocks.0.cv2.1.conv_bn_fused.weight" in state


def test_position_embedding_layout_for_a_non_square_map():
    width, height, dim = 3, 2, 8
    pos = build_2d_sincos_position_embedding(width, height, dim, temperature=10000.0)
    assert pos.shape == (1, width * height, dim)
    omega = [1.0, 1.0 / 100.0]  # 10000^(−k/2), k = 0, 1
    for n in range(width * height):
        a, b = n // height, n % height
        expected = [f(v * w) for f, v in ((math.sin, a), (math.cos, a), (math.sin, b), (math.cos, b)) for w in omega]
        torch.testing.assert_close(pos[0, n], torch.tensor(expected))


def test_position_embedding_is_cached_for_eval_size_and_recomputed_in_training():
    torch.manual_seed(0)
    encoder = s_encoder(eval_spatial_size=(128, 128))
    assert not any("pos" in key for key in encoder.state_dict())
    cached = encoder._position_embedding(2, 4, 4, torch.zeros(1))
    torch.testing.assert_close(cached, build_2d_sincos_position_embedding(4, 4, 192))
    # Training (multi-scale) works at any size; eval is tied to the cached eval size.
    feats = [torch.randn(1, 192, 160 // s, 160 // s) for s in (8, 16, 32)]
    outputs = encoder.train()(feats)
    assert [tuple(o.shape) for o in outputs] == [(1, 192, 20, 20), (1, 192, 10, 10), (1, 192, 5, 5)]
    outputs[0].mean().backward()
    assert all(p.grad is not None for p in encoder.encoder.parameters())
    with pytest.raises(ValueError, match="eval_spatial_size"), torch.no_grad():
        encoder.eval()(feats)


def test_lite_encoder_rejects_an_eval_size_with_odd_stride_16_maps():
    with pytest.raises(ValueError, match="even"):
        LiteEncoder([256], [16], 64, 0.34, 0.5, eval_spatial_size=(336, 336))


def test_copies_of_each_block_start_from_identical_weights():
    encoder = s_encoder(eval_spatial_size=None)
    for first, second in (
        (encoder.fpn_blocks[0], encoder.fpn_blocks[1]),
        (encoder.pan_blocks[0], encoder.pan_blocks[1]),
    ):
        for a, b in zip(first.parameters(), second.parameters(), strict=True):
            assert torch.equal(a, b)
    lite = atto_encoder()
    assert torch.equal(lite.down_sample1[1].weight, lite.down_sample2[1].weight)
    assert all(m.inplace for m in lite.modules() if isinstance(m, nn.SiLU))
