"""Test-wide setup: offline hub, a fresh cache folder per session, real-data location."""
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UCM_ROOT = REPO.parent / "shared" / "data" / "ucm_captions"


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"  # every test must work with the hub unreachable
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if "CMG_TEST_KEEP_CACHE" not in os.environ:
        os.environ["CMG_CACHE_DIR"] = tempfile.mkdtemp(prefix="cmg-test-cache-")


@pytest.fixture(scope="session")
def ucm_root() -> Path:
    if not (UCM_ROOT / "dataset_ucm_captions.json").is_file():
        pytest.skip(f"real UCM-captions data not found at {UCM_ROOT}")
    return UCM_ROOT
