"""Shared test fixtures: paths to the read-only reference material beside the project, skipping when it is absent."""

from pathlib import Path

import pytest
import torch

from multimodal.data.synthetic import generate

PROJECT_DIR = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 160  # of the tiny generated dataset the end-to-end tests train on
SHARED_DIR = PROJECT_DIR.parent / "shared"
MISSING_SHARED = "needs ../shared"  # the start of every skip reason below, counted in the summary


def pytest_configure(config):
    # Reference tolerances assume plain float32 on the CPU; keep the suite deterministic and bounded to 2 cores.
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(MISSING_SHARED in str(report.longrepr) for report in skipped)
    if count:
        terminalreporter.write_line(
            f"{count} tests skipped because the reference material is not at {SHARED_DIR} (official-format "
            "checkpoints and outputs, the real DEIMv2-Atto, datasets, CLIP embeddings). It ships beside the "
            "repository as ../shared; CI runs these tests with it.",
            yellow=True,
        )


def shared_path(relative: str) -> Path:
    """``../shared/<relative>``; skips the calling test when it is not there."""
    path = SHARED_DIR / relative
    if not path.exists():
        pytest.skip(f"{MISSING_SHARED}/{relative} (not found at {path})")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return shared_path("reference")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return shared_path("datasets")


@pytest.fixture(scope="session")
def real_atto() -> Path:
    """The real converged DEIMv2-Atto (COCO, 80 classes, 320 px) in the official layout."""
    return shared_path("real/deimv2_atto_coco.pth")


@pytest.fixture(scope="session")
def coco_clip() -> Path:
    """Real CLIP ViT-B/32 embeddings of "a <class>" for the 80 COCO classes, float16 [80, 512]."""
    return shared_path("clip/coco_clip_a+cname.npy")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """16 train and 8 val images of the generated defect dataset, at 160 px."""
    return generate(tmp_path_factory.mktemp("data"), seed=1, num_train=16, num_val=8, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory) -> Path:
    """One text-embedding cache for the whole session: the real text model runs once."""
    return tmp_path_factory.mktemp("text_cache")
