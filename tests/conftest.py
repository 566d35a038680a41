"""Test-wide setup: offline hub, a fresh cache folder per session, real-data location."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UCM_ROOT = REPO.parent / "shared" / "data" / "ucm_captions"


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"  # every test must work with the hub unreachable
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # umap compiles its numba kernels on first import: ~26 s in a fresh venv on a 2-core CPU.  Tests run them as
    # plain Python (what they compute does not change; our code has no numba of its own); users and bench/ run
    # them compiled.  CMG_TEST_NUMBA_JIT=1 tests them compiled.
    if os.environ.get("CMG_TEST_NUMBA_JIT") != "1":
        os.environ["NUMBA_DISABLE_JIT"] = "1"
    if "CMG_TEST_KEEP_CACHE" not in os.environ:
        config._cmg_test_cache = tempfile.mkdtemp(prefix="cmg-test-cache-")
        os.environ["CMG_CACHE_DIR"] = config._cmg_test_cache


def pytest_unconfigure(config):
    """The session's cache folder goes when the session ends (it was made by pytest_configure, nothing else)."""
    made = getattr(config, "_cmg_test_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def ucm_root() -> Path:
    if not (UCM_ROOT / "dataset_ucm_captions.json").is_file():
        pytest.skip(f"real UCM-captions data not found at {UCM_ROOT}")
    return UCM_ROOT


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny randomly initialised CLIP (open_clip model config + checkpoint file), standing in for local weights:
    (config JSON path, checkpoint path)."""
    import json

    import torch

    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("clip")
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "tiny-clip.json").write_text(json.dumps(arch))
    open_clip.add_model_config(d / "tiny-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), d / "tiny-clip.pt")
    return d / "tiny-clip.json", d / "tiny-clip.pt"
