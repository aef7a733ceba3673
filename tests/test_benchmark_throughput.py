"""The throughput benchmark: its record, the parameters each case trains, the synthetic batch and the profile counts."""

import json

import pytest
import torch
from torch import nn

from benchmarks.throughput import CASES, build_case, main, parse_args, profile_steps, synthetic_batch
from deim_lib import build_detector, get_variant
from multimodal.model.detector import attach_text
from multimodal.train.freezing import constant_parameters


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.fixture
def one_thread():
    # On the shared CI machine two spinning OpenMP workers made this run 5× slower; one thread keeps it steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_record_holds_every_case_and_phase1_trains_exactly_the_fusion_parameters(tmp_path, one_thread):
    out = tmp_path / "record.json"
    argv = ["--variant", "atto", "--image-size", "160", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    assert main([*argv, "--device", "cpu", "--json", str(out)]) == 0

    record = json.loads(out.read_text())
    results = record["results"]
    assert list(results) == list(CASES)
    assert record["torch"] == torch.__version__ and record["device_type"] == "cpu"
    for result in results.values():
        assert result["images_per_s"] > 0
        assert result["ms_per_step"] == pytest.approx(2 * 1000 / result["images_per_s"])
        assert result["first_step_s"] > 0  # the untimed warm-up step, recorded on its own
    assert results["full"]["speedup_vs_full"] == 1.0

    # Trainable counts computed independently of the benchmark, on the same architecture.
    detector = build_detector("atto", 80, eval_size=(160, 160))
    constants = sum(p.numel() for p in detector.parameters() if id(p) in constant_parameters(detector))
    model = attach_text(detector, torch.randn(80, 512))
    parts = model.parts()
    assert results["full"]["trainable_params"] == _count([detector]) - constants
    assert results["phase1"]["trainable_params"] == _count(parts["fusion"])
    assert results["phase2"]["trainable_params"] == _count(parts["fusion"] + parts["class_heads"])
    assert results["phase3"]["trainable_params"] == _count(parts["fusion"] + parts["decoder"]) - constants
    assert results["eval"]["trainable_params"] == 0
    assert results["eval"]["total_params"] == _count([model])

    # The default breakdown case is phase 1; the matcher runs inside the criterion.
    breakdown = results["phase1"]["breakdown_ms"]
    assert set(breakdown) == {"forward", "criterion", "matcher", "backward", "optimizer"}
    assert 0 < breakdown["matcher"] <= breakdown["criterion"]


def test_the_benchmark_times_the_training_step_of_train_progressive():
    """One setup and one step: the benchmark imports them from multimodal.train.step, as the training script does."""
    import train_progressive
    from benchmarks import throughput
    from multimodal.train import step

    assert throughput.train_step is step.train_step is train_progressive.train_step
    assert throughput.build_phase is step.build_phase is train_progressive.build_phase


@pytest.mark.parametrize("variant", ["atto", "l"])
def test_phase_0_takes_the_variants_lr_and_weight_decay(variant):
    args = parse_args(["--variant", variant, "--image-size", "320" if variant == "atto" else "640", "--device", "cpu"])
    case = build_case("full", args, torch.device("cpu"))
    spec = get_variant(variant)
    groups = {group["name"]: group for group in case.setup.optimizer.param_groups}
    assert (
        groups["decoder_decay"]["weight_decay"] == spec.weight_decay and groups["decoder_decay"]["lr"] == spec.base_lr
    )
    assert groups["backbone_decay"]["lr"] == spec.backbone_lr and groups["decoder_no_decay"]["weight_decay"] == 0.0


def test_synthetic_targets_are_normalised_cxcywh_boxes_inside_the_image():
    images, targets = synthetic_batch(3, 64, 5, 6, torch.device("cpu"), seed=1)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert len(targets) == 3
    for target in targets:
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.shape == (6, 4) and labels.shape == (6,) and labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() < 5
        half = boxes[:, 2:] / 2
        assert (boxes[:, :2] - half >= 0).all() and (boxes[:, :2] + half <= 1).all()
        assert (boxes[:, 2:] >= 0.05).all()
    again, _ = synthetic_batch(3, 64, 5, 6, torch.device("cpu"), seed=1)
    assert torch.equal(images, again)


def test_profile_counts_the_scalar_reads_of_each_step():
    layer = nn.Linear(4, 4)
    inputs = torch.randn(2, 4)

    def step() -> None:
        loss = layer(inputs).square().mean()
        loss.item()
        loss.item()
        loss.backward()

    profile = profile_steps(step, steps=2, device=torch.device("cpu"), top=3)
    assert profile["scalar_reads_per_step"] == 2
    assert profile["aten_ops_per_step"] > 4
    assert profile["kernels_per_step"] is None
    assert len(profile["top_ops"]) == 3
    assert all(0 < row["share"] <= 1 for row in profile["top_ops"])


def test_image_size_with_fewer_feature_cells_than_queries_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--variant", "atto", "--image-size", "128", "--device", "cpu"])
    assert "80 cells < 100 queries" in capsys.readouterr().err
