"""The `end2end` profile (cmg_core.train.end2end): encoders trained on the images of a tiny synthetic task, run
folder, resume, predictor, and the E2 loop's invariants (same batches for every method, bank in eval mode)."""
from __future__ import annotations

import json

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmg_core.config import load_config
from cmg_core.predict import Predictor
from cmg_core.runs import RUN_FILES, Run, method_slug
from cmg_core.train import train_run
from cmg_core.train.devices import Devices
from cmg_core.train.run import Training
from cmg_core.train.nets import batch_simclr_augment

# 20 normal images (16 train) + 20 anomalies, 32 px, standard ResNet-18 stem: about 5 s per E2 epoch on 2 cores
TINY = ["data.options={n_per_class: 10, classes: 4}", "data.image_size=32", "model.cifar_stem=false",
        "task.normal_classes=[circle, square]", "e1.epochs=2", "e1.batch_size=16", "cmer.rid_epochs=5",
        "cmle.n_clusters=2", "cmle.n_neighbors=3", "e2.epochs=2", "e2.batch_size=16",
        "train.methods=[ssd, cmg, cmg-mse]", "train.device=cpu"]
E2E_E1 = ["e1.encoder=end2end", "model.trunk_image_size=null"]  # E1 trained end to end too (pixel masks)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def e2e_cache(tmp_path_factory):
    """CMG_CACHE_DIR of this module's runs (text embeddings, frozen-trunk features): they all train on the same tiny
    data set, so each caption and trunk feature is computed once, as a user's cache would, not once per test (each
    test loading the text model). Kept apart from the session's cache of the other modules."""
    return tmp_path_factory.mktemp("e2e_cache")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, e2e_cache):
    """A run interrupted after E1's first epoch, run again and interrupted after E2 (ssd)'s first epoch,
    then run a third time to the end."""
    out = tmp_path_factory.mktemp("paper_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMG_CACHE_DIR", str(e2e_cache))
        cfg = load_config("configs/synthetic_end2end.yaml", [f"out_dir={out}", "name=tiny", *TINY, *E2E_E1])
        run_dir = out / "tiny"
        second = []

        def stop_at(where, calls):
            def cb(stage, done, total):
                calls.append((stage, done, total))
                if (stage, done) == where:
                    raise _Stop
            return cb

        with pytest.raises(_Stop):
            train_run(cfg, progress=stop_at(("E1", 1), []))
        e1_ckpt = torch.load(run_dir / "checkpoints" / "e1.pt", weights_only=False)["epoch"]
        with pytest.raises(_Stop):
            train_run(cfg, progress=stop_at(("E2 (ssd)", 1), second))
        first = {"info": json.loads((run_dir / "run.json").read_text()), "e1_ckpt_epoch": e1_ckpt,
                 "ckpt_epoch": torch.load(run_dir / "checkpoints" / "e2_ssd.pt", weights_only=False)["epoch"],
                 "has_ssd_model": (run_dir / "models" / "ssd.npz").exists(), "second": second,
                 "e1_mtime": (run_dir / "models" / "e1.npz").stat().st_mtime,
                 "rid_mtime": (run_dir / "models" / "rid.npz").stat().st_mtime}
        calls = []
        train_run(cfg, progress=lambda s, d, t: calls.append((s, d, t)))
    return Run.open(run_dir), first, calls


def test_interrupted_run_left_a_checkpoint(resumed):
    _, first, _ = resumed
    assert first["info"]["status"] == "failed" and "_Stop" in first["info"]["error"]
    assert first["ckpt_epoch"] == 1 and not first["has_ssd_model"]
    assert first["e1_ckpt_epoch"] == 1
    second = {(s, d) for s, d, _ in first["second"]}
    assert ("E1", 1) not in second and ("E1", 2) in second  # E1 resumed from its checkpoint


def test_resume_reruns_only_what_is_missing(resumed):
    run, first, calls = resumed
    stages = {(s, d) for s, d, _ in calls}
    assert not any(s in ("E1", "RID") and d > 0 for s, d in stages), "E1/RID retrained on resume"
    assert ("E2 (ssd)", 1) not in stages and ("E2 (ssd)", 2) in stages  # only epoch 2 of ssd re-run
    assert ("E2 (cmg)", 1) in stages and ("E2 (cmg)", 2) in stages
    assert (run.path / "models" / "e1.npz").stat().st_mtime == first["e1_mtime"]
    assert (run.path / "models" / "rid.npz").stat().st_mtime == first["rid_mtime"]
    assert "E2 (ssd): resuming after epoch 1" in run.log_tail(100)
    hist = run.history()
    keys = list(zip(hist.stage, hist.method.fillna(""), hist.epoch))
    assert len(keys) == len(set(keys))
    e2 = hist[hist.stage == "e2"]
    for m in run.methods:
        assert sorted(e2[e2.method == m].epoch) == [1, 2]
    assert sorted(hist[hist.stage == "e1"].epoch) == [1, 2]


def test_run_folder_is_complete(resumed):
    run, _, _ = resumed
    for f in RUN_FILES:
        assert (run.path / f).is_file(), f
    assert run.status == "done" and run.info["profile"] == "end2end"
    images, scores, cmer = run.images(), run.scores(), run.cmer()
    n = len(images)
    assert n == 40 and len(scores) == n and len(cmer) == n and (images.role == "train").sum() == 16
    assert {f"e1_score_{j}" for j in range(4)} <= set(cmer.columns) and cmer.rid_choice.between(0, 3).all()
    metrics = run.metrics()
    assert set(run.methods) == {"ssd", "cmg", "cmg-mse"}
    assert set(metrics) == {k for m in run.methods for k in (m, f"{m}@knn")}  # Eq.14 and k-NN scores
    for m in run.methods:
        assert np.isfinite(scores[f"score_{m}"].values).all()
        emb = run.embeddings(m)
        assert emb.shape == (n, 512) and np.isfinite(emb).all()
        assert set(metrics[m]) == {"auroc", "aupr", "fpr95", "threshold", "flagged_normal", "flagged_anomaly"}
        assert (run.path / "models" / f"{method_slug(m)}.npz").is_file()
    hist = run.history()
    assert set(hist.stage) == {"e1", "rid", "e2"}
    e2 = hist[hist.stage == "e2"]
    assert e2.auroc.notna().all() and np.isfinite(e2[["loss", "simclr", "global", "mse"]].values).all()
    cmg = e2[e2.method == "cmg"]
    assert (cmg["global"] > 0).all() and (e2[e2.method == "ssd"]["global"] == 0).all()
    assert (e2[e2.method == "cmg-mse"]["mse"] > 0).all()


def test_predictor_scores_new_images(resumed):
    run, _, _ = resumed
    pred = Predictor.load(run.path)
    assert pred.methods == [k for m in run.methods for k in (m, f"{m}@knn")]
    images = run.images()
    res = pred.explain_many(list(images.path[:2]))
    assert len(res) == 2 and len(res[0]["variants"]) == 4 and 0 <= res[0]["rid_choice"] < 4
    assert set(res[0]["scores"]) == set(pred.methods) and all(np.isfinite(v) for v in res[0]["scores"].values())
    # the stored scores of those rows are reproduced (same preprocessing as training)
    stored = run.scores()["score_ssd"].values[:2]
    assert np.allclose(pred.score(list(images.path[:2]), "ssd"), stored, rtol=1e-3, atol=1e-3)


def test_other_config_in_the_same_folder_is_refused(resumed):
    from cmg_core.errors import ConfigError

    run, _, _ = resumed
    cfg = load_config(run.path / "config.yaml", ["e2.epochs=3"])
    with pytest.raises(ConfigError, match="different config"):
        Training(cfg)


@pytest.fixture(scope="module")
def frozen_e1_run(tmp_path_factory, e2e_cache):
    """The default end2end setup: E1 a head on the frozen trunk (feature masks), E2 trained on the images."""
    out = tmp_path_factory.mktemp("e2e_frozen_e1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMG_CACHE_DIR", str(e2e_cache))
        cfg = load_config("configs/synthetic_end2end.yaml",
                          [f"out_dir={out}", "name=f", *TINY, "model.trunk_image_size=64",
                           "train.methods=[raw, ssd+er, cmg[supcon]]", "e2.epochs=1", "train.eval_every_epoch=false"])
        return Run.open(train_run(cfg))


def test_frozen_e1_run_and_its_predictor(frozen_e1_run):
    run = frozen_e1_run
    assert run.info["e1_encoder"] == "frozen" and run.info["mask_apply"] == "feature"
    assert run.info["method_labels"] == {"raw": "raw", "ssd+er": "ssd+er", "cmg[supcon]": "cmg[supcon]"}
    hist = run.history()
    sup = hist[(hist.stage == "e2") & (hist.method == "cmg[supcon]")]
    assert (sup["global"] > 0).all() and (sup["simclr"] == 0).all()  # SupCon replaces NT-Xent (released code)
    pred = Predictor.load(run.path)
    images = run.images()
    cmer = run.cmer()
    res = pred.explain_many(list(images.path[:3]))
    assert [r["rid_choice"] for r in res] == cmer.rid_choice.values[:3].tolist()
    for m in [*run.methods, "raw@knn", "cmg[supcon]@knn"]:  # raw: the frozen trunk's features at 64 px
        stored = run.scores()[f"score_{m}"].values[:3]
        assert np.allclose([r["scores"][m] for r in res], stored, rtol=1e-3, atol=1e-3)


def test_scored_features_are_fp32_under_autocast(tmp_path, monkeypatch):
    """On CUDA the training passes run under bf16 autocast; the features that are scored (E1's CMER pass, E2's
    embed) are fp32, so the Predictor (fp32, any device) reproduces the run's scores. Autocast forced on the CPU."""
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(Devices, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    cfg = load_config("configs/synthetic_end2end.yaml",
                      [f"out_dir={tmp_path}", "name=amp", *TINY, *E2E_E1, "model.backbone=cnn", "model.width=4",
                       "e1.epochs=1", "e2.epochs=1", "train.methods=[ssd+er]", "train.eval_every_epoch=false"])
    run = Run.open(train_run(cfg))
    res = Predictor.load(run.path).explain_many(list(run.images().path[:4]))
    assert [r["rid_choice"] for r in res] == run.cmer().rid_choice.values[:4].tolist()
    stored = run.scores()["score_ssd+er"].values[:4]
    assert np.allclose([r["scores"]["ssd+er"] for r in res], stored, rtol=1e-4, atol=1e-4)


def test_every_method_sees_the_same_batches_and_views(tmp_path, monkeypatch, e2e_cache):
    """NT-Xent's batches, negatives and views do not depend on the method: L_global adds clean images to the
    forward pass but changes neither which images form a batch nor how often an image is drawn."""
    import cmg_core.train.end2end as e2e

    seen, views = [], []
    real_loss, real_aug = e2e.e2_step_loss, e2e._augment

    def spy_loss(g, ids, *a, **k):
        seen.append(ids.tolist())
        return real_loss(g, ids, *a, **k)

    def spy_aug(run, x, gen):
        out = real_aug(run, x, gen)
        views.append(out.detach().clone())
        return out

    monkeypatch.setattr(e2e, "e2_step_loss", spy_loss)
    monkeypatch.setattr(e2e, "_augment", spy_aug)
    monkeypatch.setenv("CMG_CACHE_DIR", str(e2e_cache))
    cfg = load_config("configs/synthetic_end2end.yaml",
                      [f"out_dir={tmp_path}", "name=b", *TINY, "model.trunk_image_size=64", "e2.batch_size=6",
                       "train.methods=[ssd, ssd+le[lle], ssd+le[supcon]]", "train.eval_every_epoch=false",
                       "cmer.rid_epochs=1", "e1.epochs=1", "model.backbone=cnn", "model.width=4"])  # any backbone
    train_run(cfg)
    k = len(seen) // 3
    assert k >= 4 and len(seen) == 3 * k
    assert seen[:k] == seen[k : 2 * k] == seen[2 * k :]
    counts = np.bincount(np.concatenate(seen[:k]))
    assert counts.min() == counts.max() == 2  # 16 images, 2 epochs: each drawn once per epoch
    v = len(views) // 3
    for a, b, c in zip(views[:v], views[v : 2 * v], views[2 * v :]):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("on", ["clean", "views"])
def test_guidance_on_clean_or_views(tmp_path, monkeypatch, on, e2e_cache):
    """e2.guidance_on: clean adds the b un-augmented images to each forward and refills the bank every epoch;
    views forwards only the two views (2b images) and fills the bank once; both train L_global and cmg-mse."""
    import cmg_core.train.end2end as e2e
    from cmg_core.train.nets import E2Train

    sizes, fills, parts = [], [], []
    real_fwd, real_fill, real_loss = E2Train.forward, e2e.End2EndE2._fill_bank, e2e.e2_step_loss

    def spy_fwd(self, x):
        if self.training:
            sizes.append(len(x))
        return real_fwd(self, x)

    def spy_fill(self, *a, **k):
        fills.append(1)
        return real_fill(self, *a, **k)

    def spy_loss(g, ids, z1, *a, **k):
        loss, p = real_loss(g, ids, z1, *a, **k)
        parts.append((len(z1), len(k["local_idx"]), p))
        return loss, p

    monkeypatch.setattr(E2Train, "forward", spy_fwd)
    monkeypatch.setattr(e2e.End2EndE2, "_fill_bank", spy_fill)
    monkeypatch.setattr(e2e, "e2_step_loss", spy_loss)
    monkeypatch.setenv("CMG_CACHE_DIR", str(e2e_cache))
    cfg = load_config("configs/synthetic_end2end.yaml",
                      [f"out_dir={tmp_path}", "name=g", *TINY, "model.trunk_image_size=64", "model.backbone=cnn",
                       "model.width=4", "e2.batch_size=8", "e2.epochs=3", f"e2.guidance_on={on}",
                       "train.methods=[ssd+le[lle], cmg-mse]", "train.eval_every_epoch=false",
                       "cmer.rid_epochs=1", "e1.epochs=1"])
    train_run(cfg)
    factor = 2 if on == "views" else 3
    assert sizes and all(n == factor * 8 for n in sizes)  # 16 images, batches of 8
    assert len(fills) == (1 if on == "views" else 3)  # only ssd+le[lle] has a bank; 3 epochs
    assert all(ni == (2 * b if on == "views" else b) for b, ni, _ in parts)
    assert all(p["global"] > 0 or p["mse"] > 0 for _, _, p in parts)


def test_views_guidance_in_the_frozen_profile(tmp_path, monkeypatch, e2e_cache):
    """The frozen profile reads e2.guidance_on too: with views, L_global and cmg-mse act on both views."""
    import cmg_core.train.frozen as fz

    seen = []
    real_loss = fz.e2_step_loss

    def spy_loss(g, ids, z1, z2, t, **k):
        seen.append((len(ids), None if k["h_clean"] is None else len(k["h_clean"]), len(k["local_idx"])))
        return real_loss(g, ids, z1, z2, t, **k)

    monkeypatch.setattr(fz, "e2_step_loss", spy_loss)
    monkeypatch.setenv("CMG_CACHE_DIR", str(e2e_cache))
    cfg = load_config("configs/synthetic_end2end.yaml",
                      [f"out_dir={tmp_path}", "name=f", *TINY, "model.profile=frozen", "model.trunk_image_size=64",
                       "e2.guidance_on=views", "e2.epochs=1", "train.methods=[ssd+le[lle], cmg-mse]",
                       "train.eval_every_epoch=false", "cmer.rid_epochs=1", "e1.epochs=1"])
    train_run(cfg)
    assert seen and all(h == n == 2 * b for b, h, n in seen)


def test_bank_is_filled_in_eval_mode():
    """L_global's memory bank holds the eval-mode features (BatchNorm running statistics, as scored) and
    leaves the running statistics and the training mode untouched."""
    from cmg_core.models import E2Encoder
    from cmg_core.train.end2end import End2EndE2
    from cmg_core.train.nets import backbone_for

    cfg = load_config("configs/synthetic_end2end.yaml", ["model.backbone=cnn", "model.width=4"])
    torch.manual_seed(0)
    backbone, spec = backbone_for(cfg)
    enc = E2Encoder(backbone, spec.feature_dim, 16)
    images = (torch.rand(10, 3, 16, 16) * 255).to(torch.uint8)
    dev = SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False),
                          batch=lambda idx, masks=None: images[idx].float() / 255)
    ctx = SimpleNamespace(n_train=10, dev=dev)
    enc.train()
    enc(torch.rand(10, 3, 16, 16))  # give BatchNorm non-trivial running statistics
    before = {k: v.clone() for k, v in enc.named_buffers()}
    bank = End2EndE2(ctx)._fill_bank(enc, None, normalize=False)
    assert enc.training
    assert all(torch.equal(before[k], v) for k, v in enc.named_buffers())
    enc.eval()
    with torch.no_grad():
        expected = enc(images.float() / 255)[0]
    assert torch.allclose(bank, expected, atol=1e-5)


def test_batch_augment_is_per_image_and_seeded():
    x = torch.rand(6, 3, 16, 16)
    a = batch_simclr_augment(x, torch.Generator().manual_seed(1))
    b = batch_simclr_augment(x, torch.Generator().manual_seed(1))
    c = batch_simclr_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = batch_simclr_augment(x[:1].expand(6, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    assert not torch.allclose(same[0], same[1])  # every image draws its own parameters
    # the options change the views but not how many numbers are drawn
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    batch_simclr_augment(x, g1, crop_scale=(0.2, 1.0), vflip=True)
    batch_simclr_augment(x, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


@pytest.mark.parametrize("name", ["synthetic_end2end", "ucm_captions_paper", "ucm_captions_scratch"])
def test_end2end_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.profile == "end2end" and cfg.e1.encoder == "frozen"


def test_old_profile_names_still_load():
    assert load_config(None, ["model.profile=cpu"]).model.profile == "frozen"
    assert load_config(None, ["model.profile=paper"]).model.profile == "end2end"
