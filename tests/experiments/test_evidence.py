"""experiments/evidence.py: a tiny grid on the generated dataset gives the table, figure and conclusion; a half-done
grid continues without re-running what is finished; the conclusion's wording; the runs' commands."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal.config import load_config
from tests.conftest import PROJECT_DIR
from tests.test_train_progressive import official_checkpoint, write_config

spec = importlib.util.spec_from_file_location("evidence", PROJECT_DIR / "experiments" / "evidence.py")
evidence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evidence)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_data, text_cache) -> tuple[list[str], Path, str]:
    """progressive (phases 1 and 2, one epoch each), joint_2e-4 (two epochs), seed 0, and the held-out-class test with
    three of the five classes left out (one split): four processes."""
    directory = tmp_path_factory.mktemp("evidence")
    config = write_config(directory, tiny_data, text_cache)
    base = official_checkpoint(directory / "base.pth")
    output = directory / "grid"
    arguments = ["--config", config, "--init", base, "--seeds", "0", "--output", output, "--device", "cpu"]
    arguments = [*map(str, arguments), "--runs", "progressive", "joint_2e-4", "held_out_classes", "--phases", "1", "2"]
    arguments += ["--held-out-count", "3"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert evidence.main(arguments) == 0
    return arguments, output, printed.getvalue()


def test_a_tiny_grid_writes_the_table_the_figure_and_the_conclusion(grid):
    _, output, printed = grid
    assert "grid: 0/4 phases, 0/3 runs done" in printed and "grid: 4/4 phases, 3/3 runs done" in printed
    markdown = (output / "evidence.md").read_text()
    assert "| progressive | 1 | 2 |" in markdown and "| joint_2e-4 | 1 | 2 |" in markdown  # seeds, epochs
    assert "## Per class: final AP − base AP" in markdown and "| crack |" in markdown
    assert (output / "evidence_ap.png").stat().st_size > 1000
    record = json.loads((output / "evidence.json").read_text())
    assert [answer["against"] for answer in record["conclusion"]] == ["base", "joint_2e-4"]
    assert {answer["verdict"] for answer in record["conclusion"]} == {"unjudged"}  # one seed: no spread
    assert "**Kept what the detector knew?** progressive ends" in markdown
    for marker in ("progressive_s0/phase1.done", "progressive_s0/phase2.done", "joint_2e-4_s0/phase1.done"):
        assert (output / marker).is_file()
    assert not list(output.glob("*/*.lock"))
    assert "**Can a class be added by its description?** scored from their descriptions" in markdown
    (split,) = record["held_out_classes"].values()
    assert len(split["held_out"]) == 3 and set(split["variants"]) == set(evidence.held_out_classes.VARIANTS)


def modification_times(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}


def test_a_half_done_grid_continues_and_reuses_what_is_finished(grid, tmp_path, capsys):
    arguments, finished_grid, _ = grid
    output = tmp_path / "grid"
    shutil.copytree(finished_grid, output)  # copy2: modification times kept
    arguments = [str(output) if argument == str(finished_grid) else argument for argument in arguments]
    joint_files = modification_times(output / "joint_2e-4_s0")
    phase1 = (output / "progressive_s0" / "phase1_best.pth").stat().st_mtime_ns
    # Phase 2 of progressive was killed before its process ended: no marker, an unfinished resume point, and the lock
    # of the copy that ran it.
    (output / "progressive_s0" / "phase2.done").unlink()
    last = output / "progressive_s0" / "phase2_last.pth"
    torch.save(torch.load(last, weights_only=True) | {"finished": False}, last)
    lock = output / "progressive_s0" / "phase2.lock"
    lock.mkdir()
    (lock / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # alive: another copy runs it
    assert evidence.main(arguments) == 0
    assert "progressive_s0 phase2: another copy of the command runs it" in capsys.readouterr().out
    assert not (output / "progressive_s0" / "phase2.done").exists()

    ended = subprocess.Popen(["true"])  # its id, once it has ended, names a dead copy
    ended.wait()
    (lock / "owner").write_text(f"{socket.gethostname()} {ended.pid}\n")
    assert evidence.main(arguments) == 0
    assert "resuming progressive_s0 phase2" in capsys.readouterr().out
    assert "starting from the resume point" in (output / "progressive_s0" / "phase2.log").read_text()
    assert (output / "progressive_s0" / "phase2.done").is_file() and not lock.exists()
    assert modification_times(output / "joint_2e-4_s0") == joint_files
    assert (output / "progressive_s0" / "phase1_best.pth").stat().st_mtime_ns == phase1
    assert "| progressive | 1 | 2 |" in (output / "evidence.md").read_text()


@pytest.mark.parametrize(
    ("subject", "other", "verdict", "sentence"),
    [
        (
            [0.290, 0.292, 0.294],
            [0.270, 0.272, 0.274],
            "win",
            "progressive ends 0.0200 above joint_2e-4 (0.2920 vs 0.2720); the difference exceeds the seed spread "
            "(±0.0020): progressive is better.",
        ),
        (
            [0.280, 0.286, 0.292],
            [0.284, 0.290, 0.296],
            "tie",
            "progressive ends 0.0040 below joint_2e-4 (0.2860 vs 0.2900); the difference is within the seed spread "
            "(±0.0060): no difference shown.",
        ),
        (
            [0.270, 0.271, 0.272],
            [0.290, 0.291, 0.292],
            "loss",
            "progressive ends 0.0200 below joint_2e-4 (0.2710 vs 0.2910); the difference exceeds the seed spread "
            "(±0.0010): progressive is worse.",
        ),
        (
            [0.300],
            [0.280],
            "unjudged",
            "progressive ends 0.0200 above joint_2e-4 (0.3000 vs 0.2800); with one seed there is no spread to judge "
            "the difference by: run two or more.",
        ),
    ],
)
def test_the_conclusion_words_a_win_a_tie_and_a_loss_as_plainly(subject, other, verdict, sentence):
    assert evidence.compare("progressive", "joint_2e-4", subject, other) == (verdict, sentence)


def test_the_runs_reproduce_the_budgets_of_real_atto(tmp_path):
    grid = evidence.Grid(
        config=Path("coco.yaml"),
        init=Path("base.pth"),
        output=tmp_path,
        overrides=["phase1.warmup_iters=20"],
        device=["--device", "cpu"],
        budgets={1: 5, 2: 4, 3: 3},
        class_head_lr=5e-5,
        text_files={"progressive_permuted_text": tmp_path / "permuted.npy"},
        held_out_count=12,
    )
    progressive = evidence.run_steps("progressive_permuted_text", 0, grid)
    assert [step.epochs for step in progressive] == [5, 4, 3]
    assert "--init" in progressive[0].arguments and "--init" not in progressive[1].arguments
    assert progressive[1].requires == tmp_path / "progressive_permuted_text_s0" / "phase1.done"
    assert f"--set=text_encoder.precomputed={tmp_path / 'permuted.npy'}" in progressive[2].arguments
    (joint,) = evidence.run_steps("joint_2e-4", 1, grid)
    sets = [argument for argument in joint.arguments if argument.startswith("--set=")]
    assert sets == [
        "--set=phase1.warmup_iters=20",
        "--set=phase1.epochs=12",
        "--set=phase1.trainable=[fusion, encoder, decoder]",
        "--set=phase1.lr=2e-4",
    ]
    (heads,) = evidence.run_steps("class_heads_only", 0, grid)
    assert "--set=phase1.lr=5e-05" in heads.arguments and heads.epochs == 12
    (wise_ft,) = evidence.run_steps("wise_ft", 2, grid)
    assert wise_ft.requires == tmp_path / "joint_2e-4_s2" / "phase1.done"
    assert str(tmp_path / "joint_2e-4_s2" / "phase1_last.pth") in wise_ft.arguments
    steps = evidence.grid_steps(["progressive", "held_out_classes"], [0, 1], grid)
    assert [(step.run, step.seed) for step in steps] == [
        ("held_out_classes", 0),
        *[("progressive", 0)] * 3,
        *[("progressive", 1)] * 3,
    ]  # the held-out test once: it trains nothing
    assert steps[0].arguments[-5:] == ["--count", "12", "--device", "cpu", "--set=phase1.warmup_iters=20"]


def test_text_controls_are_random_unit_rows_and_a_derangement_of_the_real_rows(tmp_path, tiny_data, text_cache):
    rows = np.random.default_rng(5).standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "text.npy", rows)
    config = write_config(tmp_path, tiny_data, text_cache, text_encoder={"precomputed": str(tmp_path / "text.npy")})
    files, notes = evidence.write_text_controls(load_config(config), tmp_path, list(evidence.TEXT_RUNS))
    assert notes == []
    random_rows = np.load(files["progressive_random_text"])
    assert random_rows.shape == (5, 6) and np.allclose(np.linalg.norm(random_rows, axis=1), 1)
    real = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    permuted = np.load(files["progressive_permuted_text"])
    sources = [int(np.argmin(np.abs(real - row).sum(axis=1))) for row in permuted]
    assert sorted(sources) == list(range(5)) and all(source != row for row, source in enumerate(sources))

    np.save(tmp_path / "one.npy", rows[:1])
    one_class = ["data.classes={crack: [a crack]}", f"text_encoder.precomputed={tmp_path / 'one.npy'}"]
    files, notes = evidence.write_text_controls(
        load_config(config, one_class), tmp_path / "one", list(evidence.TEXT_RUNS)
    )
    assert list(files) == ["progressive_random_text"] and "progressive_permuted_text skipped" in notes[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--phases", "2", "3"], "error: --phases 2 3: each phase starts from the one before; give 1, 1 2 or 1 2 3"),
        (["--runs", "wise_ft"], "error: --runs wise_ft mixes joint_2e-4's end point with the base: add joint_2e-4"),
        (["--budget", "0"], "error: --budget 0.0: must be above 0"),
        (["--init", "missing.pth"], "error: --init missing.pth: not found; pass your converged detector's checkpoint"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, change, message, capsys):
    (tmp_path / "base.pth").touch()
    arguments = ["--config", "c.yaml", "--init", str(tmp_path / "base.pth"), "--seeds", "0", "--output", "out"]
    assert evidence.main([*arguments, *change]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(message)
