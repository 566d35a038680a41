"""model.trunk_precision: `auto` picks bf16 only where the hardware runs it natively (cmg_core.utils)."""
from pathlib import Path

import pytest
import torch
import yaml

from cmg_core.config import ModelConfig, load_config
from cmg_core.errors import ConfigError
from cmg_core.utils import resolve_trunk_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cpu(monkeypatch, level: str, **flags):
    """Pretend the CPU reports vector level `level` and the feature flags `flags` (torch.cpu.get_capabilities)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    caps = {"architecture": "x86_64", "avx2": True, **flags}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize("level", ["AVX2", "DEFAULT", "NO AVX"])
def test_auto_is_fp32_on_cpus_without_native_bf16(monkeypatch, level):
    # even if a feature flag claims bf16, a level below AVX512 has no bf16 kernels: fp32
    _cpu(monkeypatch, level, avx512_bf16=True)
    assert resolve_trunk_precision("auto", "cpu") == "fp32"
    assert resolve_trunk_precision("auto", torch.device("cpu")) == "fp32"


def test_auto_is_bf16_on_a_bf16_capable_cpu(monkeypatch):
    _cpu(monkeypatch, "AVX512", avx512_f=True, avx512_bf16=True)  # Cooper Lake, Sapphire Rapids, Zen 4 ...
    assert resolve_trunk_precision("auto", "cpu") == "bf16"
    _cpu(monkeypatch, "AVX512", avx512_f=True, avx512_bf16=False, amx_bf16=True)  # AMX tiles
    assert resolve_trunk_precision("auto", torch.device("cpu")) == "bf16"


def test_auto_is_fp32_on_avx512_without_bf16(monkeypatch):
    _cpu(monkeypatch, "AVX512", avx512_f=True, avx512_bf16=False)  # Skylake-X / Cascade Lake: bf16 is emulated
    assert resolve_trunk_precision("auto", "cpu") == "fp32"


def test_auto_on_cuda_follows_native_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_trunk_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_trunk_precision("auto", "cuda") == "bf16"
    seen = {}

    def native_only(*args, **kwargs):  # pre-Ampere GPUs only emulate bf16
        seen.update(kwargs)
        return kwargs.get("including_emulation", True)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_only)
    assert resolve_trunk_precision("auto", "cuda:0") == "fp32"
    assert seen == {"including_emulation": False}


@pytest.mark.parametrize("value", ["bf16", "fp32"])
def test_explicit_values_are_returned_as_given(monkeypatch, value):
    _cpu(monkeypatch, "AVX2")
    assert resolve_trunk_precision(value, "cpu") == value
    _cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert resolve_trunk_precision(value, torch.device("cpu")) == value


def test_unknown_value_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, bf16 or fp32"):
        resolve_trunk_precision("fp16", "cpu")


def test_config_default_is_auto_and_validated():
    assert ModelConfig().trunk_precision == "auto"
    assert load_config().model.trunk_precision == "auto"
    for value in ("auto", "bf16", "fp32"):
        assert load_config(overrides=[f"model.trunk_precision={value}"]).model.trunk_precision == value
    with pytest.raises(ConfigError, match=r"model.trunk_precision='fp16'; expected auto, bf16 or fp32"):
        load_config(overrides=["model.trunk_precision=fp16"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_forces_bf16(path):
    data = yaml.safe_load(path.read_text()) or {}
    assert (data.get("model") or {}).get("trunk_precision", "auto") != "bf16"
