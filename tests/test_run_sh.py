"""run.sh demo: training, then one annotated validation image in the demo's output folder."""

import hashlib
import shutil
import subprocess

from tests.conftest import PROJECT_DIR

REQUIREMENTS = ("requirements.txt", "requirements-dev.txt", "requirements-lock.txt")
# Stands in for .venv/bin/python: logs its arguments; "training" writes the final checkpoint unless asked for --help.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> calls.log
if [ "$1" = train_progressive.py ] && [[ " $* " != *" --help "* ]]; then
  mkdir -p checkpoints/demo && touch checkpoints/demo/phase3_best.pth
fi
"""


def run_demo(folder, *arguments: str) -> list[str]:
    """The commands ``run.sh demo ARGUMENTS`` runs in a copy of the project whose venv is ``FAKE_PYTHON``."""
    for name in ("run.sh", *REQUIREMENTS):
        shutil.copy(PROJECT_DIR / name, folder / name)
    python = folder / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    digest = hashlib.sha256(b"".join((folder / name).read_bytes() for name in REQUIREMENTS)).hexdigest()
    (folder / ".venv" / f".installed-{digest[:16]}").touch()  # as run.sh marks an installed venv: nothing to install
    done = subprocess.run(
        ["bash", "run.sh", "demo", *arguments], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return (folder / "calls.log").read_text().splitlines()


def test_the_demo_trains_then_draws_one_validation_image_into_its_output_folder(tmp_path):
    assert run_demo(tmp_path, "--set", "seed=1") == [
        "train_progressive.py --config configs/demo.yaml --phase all --output-dir checkpoints/demo --set seed=1",
        "-m multimodal.tools.predict --checkpoint checkpoints/demo/phase3_best.pth "
        "--images data/synthetic_defects/images/val/00002.jpg --output checkpoints/demo/prediction --draw-nms 0.5",
    ]


def test_the_demo_draws_nothing_when_it_trained_nothing(tmp_path):
    assert run_demo(tmp_path, "--help") == [
        "train_progressive.py --config configs/demo.yaml --phase all --output-dir checkpoints/demo --help"
    ]
