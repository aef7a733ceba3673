"""train_progressive.py end to end on a tiny generated dataset: phases, frozen parts, checkpoints, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train_progressive
from deim_lib import build_detector, load_official_checkpoint
from deim_lib.data.synthetic import CLASS_DESCRIPTIONS, generate
from multimodal.model import attach_text, split_state
from multimodal.phases import apply_phase, constant_parameters

PROJECT_DIR = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 160


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("data"), seed=1, num_train=16, num_val=8, image_size=IMAGE_SIZE)


def write_config(directory: Path, data: dict[str, Path], **sections) -> Path:
    config = {
        "model": {"variant": "atto", "image_size": IMAGE_SIZE},
        "data": {
            **{name: str(path) for name, path in data.items()},
            "classes": {name: [description] for name, description in CLASS_DESCRIPTIONS.items()},
            "batch_size": 4,
            "val_batch_size": 8,
            "num_workers": 0,
        },
        "text_encoder": {"pretrained": None, "cache_dir": str(directory / "text_cache")},
        **{f"phase{i}": {"epochs": 1, "warmup_iters": 2, "ema_warmups": 5} for i in range(4)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_DIR / "train_progressive.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def official_checkpoint(path: Path, num_classes: int = 5, variant: str = "atto") -> Path:
    torch.manual_seed(0)
    eval_size = (IMAGE_SIZE, IMAGE_SIZE) if variant == "atto" else None
    state = build_detector(variant, num_classes, eval_size=eval_size).state_dict()
    torch.save({"model": state, "ema": {"module": state, "updates": 1}}, path)
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(first: dict, second: dict, keys=None):
    for key in keys if keys is not None else first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("variant", ["atto", "s"])
def test_trainable_parts_per_phase(variant):
    detector = build_detector(variant, 3)
    model = attach_text(detector, torch.nn.functional.normalize(torch.randn(3, 512), dim=-1))
    constants = constant_parameters(model)
    parts = model.parts()
    for trainable, expected_modules in [
        (["fusion"], [model.fusion]),
        (["fusion", "class_heads"], [model.fusion, detector.decoder.enc_score_head, detector.decoder.dec_score_head]),
        (["fusion", "decoder"], [model.fusion, detector.decoder]),
    ]:
        policy = apply_phase(model, parts, trainable, constants)
        expected = {id(p) for m in expected_modules for p in m.parameters() if id(p) not in constants}
        assert {id(p) for p in model.parameters() if p.requires_grad} == expected
        assert not any(p.requires_grad for p in detector.backbone.parameters())
        policy.set_train_mode(model, (detector.decoder, detector.decoder.decoder))
        assert not detector.backbone.training and not detector.encoder.training
        assert model.fusion.training and detector.decoder.training


def test_all_phases_keep_frozen_parts_bit_identical(tmp_path, tiny_data):
    config = write_config(tmp_path, tiny_data)
    result = train("--config", config, "--phase", "all", "--output-dir", tmp_path / "out")
    out = tmp_path / "out"
    phase0, phase1 = load(out / "phase0_best.pth"), load(out / "phase1_last.pth")
    phase2, phase3 = load(out / "phase2_last.pth"), load(out / "phase3_last.pth")
    # Phase 1 starts from phase 0's best (EMA) weights and trains only the fusion: the detector, BatchNorm statistics
    # included, is exactly phase 0's best.
    assert_same_tensors(phase0["ema"]["module"], phase1["model"])
    assert_same_tensors(phase0["ema"]["module"], phase1["ema"]["module"])
    assert "fusion" not in phase0 and all(phase1["fusion"][f"fusion.levels.{i}.alpha"] != 0 for i in range(2))
    # Phase 2 changes only the class heads; phase 3 only the decoder.
    start2 = phase1["ema"]["module"]
    changed2 = {k for k in start2 if not torch.equal(start2[k], phase2["model"][k])}
    assert changed2 and all(k.startswith(("decoder.enc_score_head", "decoder.dec_score_head")) for k in changed2)
    start3 = phase2["ema"]["module"]
    changed3 = {k for k in start3 if not torch.equal(start3[k], phase3["model"][k])}
    assert changed3 and all(k.startswith("decoder.") for k in changed3)
    assert phase1["optimizer"]["param_groups"][0]["name"].startswith("fusion")
    assert {g["name"].split("_")[0] for g in phase2["optimizer"]["param_groups"]} == {"fusion", "class"}
    # A phase checkpoint is also an official-format one: its EMA detector loads strictly into a plain DEIMv2 model.
    official = build_detector("atto", 5, eval_size=(IMAGE_SIZE, IMAGE_SIZE))
    official.load_state_dict(load_official_checkpoint(out / "phase3_best.pth"), strict=True)
    for phase in range(4):
        assert f"phase {phase} done" in result.stdout
    assert (out / "report.md").is_file() and (out / "curves.png").stat().st_size > 1000
    assert "RANDOM weights" in result.stdout and "phase 3" in result.stdout.splitlines()[-1]
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == 4 and '"gates"' in records[-1] and (out / "baseline.json").is_file()


def test_sigkill_and_resume_ends_with_identical_weights(tmp_path, tiny_data):
    init = official_checkpoint(tmp_path / "base.pth")
    overrides = {"phase1": {"epochs": 2, "checkpoint_every_steps": 1}}
    config = write_config(tmp_path, tiny_data, **overrides)
    train("--config", config, "--phase", "1", "--init", init, "--output-dir", tmp_path / "uninterrupted")

    killed_dir = tmp_path / "killed"
    command = [sys.executable, str(PROJECT_DIR / "train_progressive.py"), "--config", str(config), "--phase", "1"]
    command += ["--init", str(init), "--output-dir", str(killed_dir)]
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "phase1_last.pth"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.is_file() and load(last)["step"] >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = load(last)["step"]
    assert 3 <= killed_at < 8, "the run must be killed mid-phase (8 steps in all)"

    train("--config", config, "--phase", "1", "--resume", last, "--output-dir", killed_dir)
    expected, resumed = load(tmp_path / "uninterrupted" / "phase1_last.pth"), load(last)
    assert resumed["step"] == expected["step"] == 8
    assert_same_tensors(expected["fusion"], resumed["fusion"])
    assert_same_tensors(expected["fusion_ema"], resumed["fusion_ema"])
    assert_same_tensors(expected["model"], resumed["model"])


def test_next_phase_starts_from_the_best_weights_of_a_given_checkpoint(tmp_path, tiny_data):
    init = official_checkpoint(tmp_path / "base.pth")
    config = write_config(tmp_path, tiny_data)
    train("--config", config, "--phase", "1", "--init", init, "--output-dir", tmp_path / "a")
    result = train(
        "--config",
        config,
        "--phase",
        "2",
        "--resume",
        tmp_path / "a" / "phase1_last.pth",
        "--output-dir",
        tmp_path / "b",
    )
    assert "best weights of phase 1" in result.stdout
    phase1_best, phase2 = load(tmp_path / "a" / "phase1_best.pth"), load(tmp_path / "b" / "phase2_last.pth")
    assert phase2["phase"] == 2 and phase2["state"]["step"] == 4  # a fresh optimizer: 4 steps of phase 2 only
    frozen = [k for k in phase1_best["ema"]["module"] if "score_head" not in k]
    assert_same_tensors(phase1_best["ema"]["module"], phase2["model"], frozen)


def fake_phase_checkpoint(path: Path, phase: int, text_dim: int = 512) -> Path:
    """A phase checkpoint as train_progressive.py lays it out (weights only; enough to be rejected early)."""
    model = attach_text(build_detector("atto", 5, eval_size=(IMAGE_SIZE, IMAGE_SIZE)), torch.randn(5, text_dim))
    detector_state, fusion_state = split_state(model.state_dict())
    torch.save({"phase": phase, "model": detector_state, "fusion": fusion_state, "step": 1, "finished": False}, path)
    return path


def bad_input_cases(tmp_path: Path, data: dict[str, Path]) -> list[tuple[list, str]]:
    """(arguments, expected fragment of the one-line error) for each bad-input case."""
    ok = official_checkpoint(tmp_path / "ok.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ok.read_bytes()[:4000])
    renamed = {name: [text] for name, text in CLASS_DESCRIPTIONS.items()}
    renamed["dent"] = renamed.pop("scratch")
    empty = tmp_path / "empty.json"
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_DESCRIPTIONS)]
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [
        (["--phase", "1", "--init", tmp_path / "missing.pth"], "checkpoint file not found"),
        (["--phase", "1", "--init", truncated], "not a readable PyTorch checkpoint"),
        (["--phase", "1", "--init", official_checkpoint(tmp_path / "femto.pth", 5, "femto")], "look like variant"),
        (["--phase", "1", "--init", official_checkpoint(tmp_path / "c3.pth", 3)], "3 classes, the model 5"),
        (["--phase", "1", "--init", ok, "--set", f"data.classes={renamed}"], "differ from the dataset's"),
        (["--phase", "1", "--set", "data.batchsize=2"], "did you mean 'data.batch_size'"),
        (["--phase", "2"], "nothing to start from"),
        (["--phase", "1", "--resume", fake_phase_checkpoint(tmp_path / "p2.pth", 2)], "cannot start phase 1"),
        (["--phase", "1", "--set", "phase1.trainable=[fusion, backbone]"], "allow_backbone_training"),
        (["--phase", "1", "--init", ok, "--set", f"data.train_annotations={empty}"], "has no images"),
        (["--phase", "1", "--init", ok, "--output-dir", a_file / "out"], "cannot create the output directory"),
        (["--phase", "1", "--device", "cuda"], "no CUDA device"),
        (["--phase", "1", "--init", ok, "--set", "model.image_size=192"], "set model.image_size"),
        (["--phase", "1", "--resume", fake_phase_checkpoint(tmp_path / "p1.pth", 1, text_dim=256)], "fusion"),
    ]


def test_bad_inputs_fail_with_one_line_errors(tmp_path, tiny_data, capsys):
    # In-process (main() is what the script runs) to keep fourteen cases fast.
    config = write_config(tmp_path, tiny_data)
    for arguments, fragment in bad_input_cases(tmp_path, tiny_data):
        output_dir = [] if "--output-dir" in arguments else ["--output-dir", tmp_path / "out"]
        code = train_progressive.main([str(a) for a in ["--config", config, *output_dir, *arguments]])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (arguments, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (arguments, lines)
        assert not list((tmp_path / "out").glob("*.pth")), "a failed run must not leave checkpoints behind"


def test_torchrun_two_processes_match_a_single_process(tmp_path, tiny_data):
    """Phase 1 under torchrun (2 CPU processes, gloo): identical weights on both ranks (checked by the script at
    the end of the phase), a checkpoint that loads, and sharded evaluation equal to a single-process evaluation."""
    init = official_checkpoint(tmp_path / "base.pth")
    config = write_config(tmp_path, tiny_data)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(PROJECT_DIR / "train_progressive.py"), "--config", str(config), "--phase", "1"]
    command += ["--init", str(init), "--output-dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share two cores
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on 2 processes" in result.stdout
    assert result.stdout.count("phase 1 done") == 1  # logs come from rank 0 only

    checkpoint = load(out / "phase1_best.pth")
    assert checkpoint["state"]["step"] == 4  # 16 images, global batch 4: 2 per process, 8 images per process
    ddp_record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    single = train(
        "--config",
        config,
        "--phase",
        "1",
        "--init",
        out / "phase1_best.pth",
        "--eval-only",
        "--output-dir",
        tmp_path / "single",
    )
    single_metrics = json.loads(single.stdout.split("metrics: ")[1].splitlines()[0])
    assert single_metrics["AP"] == pytest.approx(ddp_record["AP"], abs=1e-6)
    assert single_metrics["AP50"] == pytest.approx(ddp_record["AP50"], abs=1e-6)


def test_repeated_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    init = official_checkpoint(tmp_path / "base.pth")
    config = write_config(
        tmp_path, tiny_data, phase1={"epochs": 2, "checkpoint_every_steps": 1}, monitor={"max_nonfinite_steps": 2}
    )
    real_build_criterion = train_progressive.build_criterion

    class PoisonedAfterThreeSteps(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, outputs, targets, epoch=0):
            self.calls += 1
            losses = self.criterion(outputs, targets, epoch=epoch)
            return losses if self.calls <= 3 else {k: v * float("nan") for k, v in losses.items()}

    def poisoned_after_three_steps(variant, num_classes):
        return PoisonedAfterThreeSteps(real_build_criterion(variant, num_classes))

    monkeypatch.setattr(train_progressive, "build_criterion", poisoned_after_three_steps)
    out = tmp_path / "out"
    code = train_progressive.main(
        [str(a) for a in ["--config", config, "--phase", "1", "--init", init, "--output-dir", out]]
    )
    assert code == 2
    checkpoint = load(out / "phase1_last.pth")  # intact: written atomically before the bad steps
    assert checkpoint["step"] == 3 and not checkpoint["finished"]


def test_forgetting_guard_stops_the_phase_and_keeps_the_best_checkpoint(tmp_path, tiny_data, capsys):
    init = official_checkpoint(tmp_path / "base.pth")
    # A negative allowance makes every epoch "too far below the base".
    config = write_config(tmp_path, tiny_data, phase1={"epochs": 3}, monitor={"max_ap_drop": -1.0, "on_drop": "stop"})
    out = tmp_path / "out"
    code = train_progressive.main(
        [str(a) for a in ["--config", config, "--phase", "1", "--init", init, "--output-dir", out]]
    )
    assert code == 0
    assert "stopped by the forgetting guard" in capsys.readouterr().out
    assert load(out / "phase1_best.pth")["state"]["epoch"] == 1  # one epoch of three, then the guard
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_demo_config_runs_all_phases_when_shortened(tmp_path):
    """The README's demo (configs/demo.yaml, phases 0 → 3 on generated data), cut down by --set."""
    shortened = ["data.synthetic_images=[24, 8]", "model.image_size=160", "data.num_workers=0", "data.batch_size=8"]
    shortened += [f"phase{i}.epochs=1" for i in range(4)]
    shortened += [f"data.synthetic_dir={tmp_path / 'synthetic'}", f"text_encoder.cache_dir={tmp_path / 'cache'}"]
    arguments = ["--config", PROJECT_DIR / "configs" / "demo.yaml", "--phase", "all", "--output-dir", tmp_path / "out"]
    result = train(*arguments, *[item for assignment in shortened for item in ("--set", assignment)])
    assert "generated the synthetic defect dataset" in result.stdout
    table = result.stdout[result.stdout.index("stage") :].splitlines()
    assert [line.split()[0] for line in table[:2]] == ["stage", "base"]
    assert [" ".join(line.split()[:2]) for line in table[2:6]] == [f"phase {i}" for i in range(4)]
    assert len(list((tmp_path / "synthetic" / "images" / "train").iterdir())) == 24


def test_text_aware_classification_trains_and_travels_to_the_next_phase(tmp_path, tiny_data, capsys):
    init = official_checkpoint(tmp_path / "base.pth")
    config = write_config(tmp_path, tiny_data, fusion={"text_aware_classification": True})
    out = tmp_path / "out"
    for arguments in (["--phase", "1", "--init", init], ["--phase", "2"]):
        assert train_progressive.main([str(a) for a in ["--config", config, "--output-dir", out, *arguments]]) == 0
    phase1, phase2 = load(out / "phase1_best.pth"), load(out / "phase2_last.pth")
    assert phase1["fusion"]["text_classifier.scale"] != 0  # trained from its zero start in phase 1
    assert "best weights of phase 1" in capsys.readouterr().out
    assert not torch.equal(phase2["fusion"]["text_classifier.scale"], phase1["fusion_ema"]["text_classifier.scale"])


def test_compiled_frozen_parts_train_like_the_plain_loop(tmp_path, tiny_data, capsys):
    init = official_checkpoint(tmp_path / "base.pth")
    config = write_config(tmp_path, tiny_data)
    for name, extra in (("plain", []), ("compiled", ["--set", "compile_frozen=true"])):
        arguments = ["--config", config, "--phase", "1", "--init", init, "--output-dir", tmp_path / name, *extra]
        assert train_progressive.main([str(a) for a in arguments]) == 0
    assert "torch.compile on the frozen parts ['backbone', 'encoder']" in capsys.readouterr().out
    plain, compiled = load(tmp_path / "plain" / "phase1_last.pth"), load(tmp_path / "compiled" / "phase1_last.pth")
    assert_same_tensors(plain["model"], compiled["model"])  # the frozen detector, BatchNorm statistics included
    for key, value in plain["fusion"].items():
        torch.testing.assert_close(compiled["fusion"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    plain_record, compiled_record = (
        json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]) for name in ("plain", "compiled")
    )
    assert plain_record["train"].keys() == compiled_record["train"].keys()
    for key, value in plain_record["train"].items():
        if key.startswith("loss"):  # the epoch's mean losses
            assert compiled_record["train"][key] == pytest.approx(value, rel=1e-5), key
    assert compiled_record["AP"] == pytest.approx(plain_record["AP"], abs=1e-6)
