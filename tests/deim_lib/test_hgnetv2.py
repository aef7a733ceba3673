"""HGNetv2: official key layout, reference feature statistics, stage table, freezing and pretrained loading."""

from pathlib import Path

import pytest
import torch
from torch import nn

from deim_lib.backbone.hgnetv2 import FrozenBatchNorm2d, HGNetv2
from deim_lib.errors import CheckpointError


def official_entries(reference_dir: Path, variant: str, prefix: str) -> list[tuple[str, list[int], str]]:
    """(key without ``prefix``, shape, kind) of the official state_dict listing, in listing order."""
    entries = []
    for line in (reference_dir / f"deimv2_keys_{variant}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype, kind = line.split("\t")
        if key.startswith(prefix):
            dims = shape.strip("[]")
            entries.append((key[len(prefix) :], [int(d) for d in dims.split(",")] if dims else [], kind))
    return entries


def official_weights(reference_dir: Path, variant: str, prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix`` entries of the reference checkpoint's EMA weights, floats upcast to float32."""
    module = torch.load(reference_dir / f"deimv2_{variant}_c6.pth", weights_only=True)["ema"]["module"]
    return {
        key[len(prefix) :]: value.float() if value.is_floating_point() else value
        for key, value in module.items()
        if key.startswith(prefix)
    }


def assert_matches_reference_stats(outputs: list[torch.Tensor], expected: list[dict]) -> None:
    """Per level: shape, float64 mean / abs-mean / std (unbiased) within relative 1e-5, first 8 values within 1e-4."""
    assert len(outputs) == len(expected)
    for output, stats in zip(outputs, expected, strict=True):
        assert list(output.shape) == stats["shape"]
        values = output.double()
        for measured, name in ((values.mean(), "mean"), (values.abs().mean(), "abs_mean"), (values.std(), "std")):
            assert measured.item() == pytest.approx(stats[name], rel=1e-5, abs=1e-7), name
        torch.testing.assert_close(output.flatten()[:8], torch.tensor(stats["first8"]), rtol=0, atol=1e-4)


def atto_backbone(**kwargs) -> HGNetv2:
    return HGNetv2("Atto", [2], use_lab=True, **kwargs)


def test_atto_state_dict_keys_and_shapes_equal_official_listing(reference_dir):
    expected = [(key, shape) for key, shape, _ in official_entries(reference_dir, "atto", "backbone.")]
    assert [(key, list(value.shape)) for key, value in atto_backbone().state_dict().items()] == expected


def test_atto_parameter_count_equals_official_listing(reference_dir):
    entries = official_entries(reference_dir, "atto", "backbone.")
    expected = sum(torch.Size(shape).numel() for _, shape, kind in entries if kind == "param")
    assert sum(p.numel() for p in atto_backbone().parameters()) == expected == 230_344


def test_atto_eval_features_match_reference_statistics(reference_dir):
    backbone = atto_backbone()
    backbone.load_state_dict(official_weights(reference_dir, "atto", "backbone."), strict=True)
    io = torch.load(reference_dir / "deimv2_atto_c6_io.pt", weights_only=True)
    with torch.no_grad():
        features = backbone.eval()(io["pixel_values"])
    assert_matches_reference_stats(features, io["debug"]["backbone_outputs"])


def test_frozen_norm_loads_official_batchnorm_weights_and_gives_eval_outputs(reference_dir):
    # Official BN weights carry num_batches_tracked; the frozen copy must accept them and compute eval-mode BN.
    weights = official_weights(reference_dir, "atto", "backbone.")
    reference, frozen = atto_backbone().eval(), atto_backbone(freeze_norm=True).train()
    reference.load_state_dict(weights, strict=True)
    frozen.load_state_dict(weights, strict=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert not any(key.endswith("num_batches_tracked") for key in frozen.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x)[0], reference(x)[0], rtol=1e-4, atol=1e-4)


def test_frozen_batchnorm_equals_eval_batchnorm_and_has_no_parameters():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        for tensor in (bn.weight, bn.bias, bn.running_mean):
            tensor.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_b5_x_config_freezes_stem_only_and_uses_frozen_norm():
    with torch.device("meta"):
        backbone = HGNetv2("B5", [1, 2, 3], use_lab=False, freeze_at=0, freeze_stem_only=True, freeze_norm=True)
    frozen = [name for name, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith("stem.") for name in frozen)
    # Stem conv kernels only (frozen BN affine terms are buffers); the official 25,442 adds decoder.up and reg_scale.
    assert sum(backbone.get_parameter(name).numel() for name in frozen) == 25_440
    assert all(p.requires_grad for name, p in backbone.named_parameters() if name.startswith("stages."))
    assert not any(key.endswith("num_batches_tracked") for key in backbone.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert not any(key.endswith("lab.scale") for key in backbone.state_dict())
    assert backbone.out_channels == [512, 1024, 2048]


def test_freeze_at_without_stem_only_also_freezes_the_first_stages():
    backbone = HGNetv2("Atto", [2], use_lab=True, freeze_at=1, freeze_stem_only=False)
    frozen_prefixes = {".".join(name.split(".")[:2]) for name, p in backbone.named_parameters() if not p.requires_grad}
    stem = {f"stem.stem{i}" for i in ("1", "2a", "2b", "3", "4")}
    assert frozen_prefixes == stem | {"stages.0", "stages.1"}
    assert all(p.requires_grad for p in backbone.stages[2].parameters())


def test_b0_returns_every_stage_at_strides_4_to_32():
    backbone = HGNetv2("B0", [0, 1, 2, 3], use_lab=True).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 96, 64))
    assert [tuple(f.shape) for f in features] == [(1, 64, 24, 16), (1, 256, 12, 8), (1, 512, 6, 4), (1, 1024, 3, 2)]
    assert backbone.out_channels == [64, 256, 512, 1024]
    assert backbone.out_strides == [4, 8, 16, 32]


def test_activations_run_in_place_and_training_backward_reaches_every_parameter():
    backbone = atto_backbone().train()
    assert all(m.inplace for m in backbone.modules() if isinstance(m, nn.ReLU))
    backbone(torch.rand(2, 3, 64, 64))[0].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_load_pretrained_keeps_only_entries_with_matching_shapes(tmp_path):
    source = HGNetv2("B0", [3], use_lab=True)
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save({"model": source.state_dict()}, path)
    target = atto_backbone()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = target.load_pretrained(path)
    own = target.state_dict()
    # Atto shares B0's stem and first two stages; its third stage is narrower, so most of it is skipped.
    assert {k for k in own if k.startswith(("stem.", "stages.0.", "stages.1."))} <= set(loaded)
    assert "stages.2.blocks.0.aggregation.1.conv.weight" not in loaded
    for key in own:
        expected = source.state_dict()[key] if key in loaded else before[key]
        assert torch.equal(own[key], expected), key


def test_load_pretrained_rejects_garbage_with_the_file_name(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        atto_backbone().load_pretrained(garbage)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(CheckpointError, match=r"list\.pth"):
        atto_backbone().load_pretrained(not_a_state_dict)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Atto"):
        HGNetv2("Zepto", [2], use_lab=True)
