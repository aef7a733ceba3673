"""Shared test fixtures: paths to the read-only reference material beside the project."""

from pathlib import Path

import pytest
import torch

PROJECT_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = PROJECT_DIR.parent / "shared"
REFERENCE_DIR = SHARED_DIR / "reference"
DATASETS_DIR = SHARED_DIR / "datasets"


def pytest_configure(config):
    # Reference tolerances assume plain float32 on the CPU; keep the suite deterministic and bounded to 2 cores.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS_DIR.is_dir():
        pytest.skip(f"datasets not found at {DATASETS_DIR}")
    return DATASETS_DIR
