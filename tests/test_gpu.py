"""The end-to-end path on a GPU (`bench/gpu_checks.py` under pytest): skipped without CUDA or without a packed
UCM file (CMG_GPU_PACK, see bench/gpu_paper.sh)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_checks  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not os.environ.get("CMG_GPU_PACK"),
                                reason="needs CUDA and CMG_GPU_PACK (a packed file with trunk features)")


def test_device():
    assert "torch" in gpu_checks.check_device("cuda")


def test_augment_on_device_matches_cpu():
    gpu_checks.check_augment("cuda")


def test_every_method_trains_on_the_gpu(tmp_path):
    gpu_checks.check_run(os.environ["CMG_GPU_PACK"], tmp_path, "cuda", [])


def test_end2end_e1_and_predictor_on_the_gpu(tmp_path):
    gpu_checks.check_end2end_e1_and_predictor(os.environ["CMG_GPU_PACK"], tmp_path, "cuda", [])
