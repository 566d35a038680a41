"""End-to-end runs of the frozen profile on small synthetic sets."""
import json

import numpy as np
import pytest

from cmg_core.cli import main
from cmg_core.config import load_config
from cmg_core.data import load_dataset
from cmg_core.data.synthetic import object_region_fraction
from cmg_core.errors import ConfigError
from cmg_core.train import train_run
from cmg_core.runs import RUN_FILES, Run

SMALL = ["data.options={n_per_class: 40, classes: 5}", "task.normal_classes=[circle, square, triangle]",
         "e1.epochs=25", "cmer.rid_epochs=30", "e2.epochs=3", "e2.n_views=1", "model.head_hidden=128"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Default settings: the frozen profile masks in feature space (cmer.apply: auto -> feature)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={out}", "name=small", *SMALL])
    return Run.open(train_run(cfg))


@pytest.fixture(scope="module")
def small_pixel_run(tmp_path_factory):
    """The same run with pixel masking (the paper's; the trunk sees the masked image)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={out}", "name=small_pixel", *SMALL, "cmer.apply=pixel"])
    return Run.open(train_run(cfg))


def test_run_folder_is_complete(small_run):
    for f in RUN_FILES:
        assert (small_run.path / f).is_file(), f
    assert small_run.status == "done"
    images, scores, cmer = small_run.images(), small_run.scores(), small_run.cmer()
    assert len(images) == len(scores) == len(cmer) == 200
    assert (images.role == "train").sum() == 96  # 3 normal classes x 40 x 0.8
    for m in small_run.methods:
        s = scores[f"score_{m}"].values
        assert np.isfinite(s).all()
        emb = small_run.embeddings(m)
        assert emb.shape[0] == 200 and np.isfinite(emb).all()
        for key in (m, f"{m}@knn"):  # every method's features, scored by Eq.14 and by k-NN
            assert set(small_run.metrics()[key]) == {"auroc", "aupr", "fpr95", "threshold", "flagged_normal",
                                                     "flagged_anomaly"}
            assert np.isfinite(scores[f"score_{key}"].values).all()
    assert small_run.methods[0] == "raw" and small_run.embeddings("raw").shape == (200, 1280)  # trunk features
    hist = small_run.history()
    assert set(hist.stage) == {"e1", "rid", "e2"}
    assert (hist[hist.stage == "e2"].groupby("method").epoch.max() == 3).all()


@pytest.mark.parametrize("fixture, margin, rid_margin", [("small_run", 0.15, 0.05), ("small_pixel_run", 0.25, 0.15)])
def test_cmer_and_rid_find_background(request, fixture, margin, rid_margin):
    """CMER (with captions) and RID (without) mask background-only regions far more often than chance.
    Pixel masks are exact; a feature-map cell also sees pixels outside its region (receptive field), so
    feature-space masking is a coarser mask: measured CMER hits 100 % (pixel) vs 86 % (feature) at 64 %
    chance, RID validation accuracy 0.40-0.63 (pixel) vs 0.32 (feature) at chance 0.25."""
    small_run = request.getfixturevalue(fixture)
    cfg = small_run.config()
    ds = load_dataset("synthetic", **cfg.data.options)
    images, cmer = small_run.images(), small_run.cmer()
    frac = object_region_fraction(ds.meta["object_boxes"][images["index"].values], cfg.data.image_size, 2)
    background = frac <= 0
    rows = np.arange(len(images))
    train = (images.role == "train").values
    chance = background[train].mean()
    cmer_hits = background[rows, cmer.cmer_label.values][train].mean()
    rid_hits_test = background[rows, cmer.rid_choice.values][~train].mean()
    assert cmer_hits > chance + margin, (cmer_hits, chance)
    assert rid_hits_test > background[~train].mean() + 0.1, rid_hits_test  # held-out images, no captions
    rid = small_run.history().query("stage == 'rid'")
    assert rid.val_acc.iloc[-1] > 1 / 4 + rid_margin, rid.val_acc.iloc[-1]  # above chance 1/M


def test_explain_and_cli(small_run, capsys, tmp_path):
    img = small_run.images().path.iloc[-1]
    assert main(["explain", img, "--run", str(small_run.path), "--save", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "RID choice" in out and "cmg" in out and "percentile" in out
    assert "calibrated: expected 5 % of normal images flagged" in out
    assert (tmp_path / "m.png").is_file()
    assert main(["evaluate", str(small_run.path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    stored = small_run.metrics()
    assert metrics.keys() == stored.keys()
    for m in metrics:
        assert metrics[m] == pytest.approx(stored[m])
        assert 0 <= metrics[m]["flagged_normal"] <= 100  # the verdict's realised FPR on held-out normals


def test_resume_after_interruption(tmp_path):
    # E1 and RID are only resumed from their saved models here (2 epochs each suffice); one cached view per image
    overrides = [f"out_dir={tmp_path}", "name=r", *SMALL, "train.methods=[ssd, cmg]", "e1.epochs=2",
                 "cmer.rid_epochs=2", "e2.n_views=1"]
    cfg = load_config("configs/synthetic.yaml", overrides)

    class Stop(Exception):
        pass

    def interrupt(stage, done, total):
        if stage == "E2 (cmg)" and done == 2:
            raise Stop()

    with pytest.raises(Stop):
        train_run(cfg, progress=interrupt)
    run = Run.open(tmp_path / "r")
    assert run.status == "failed"
    e1_mtime = (run.path / "models" / "e1.npz").stat().st_mtime
    ssd_mtime = (run.path / "models" / "ssd.npz").stat().st_mtime
    assert (run.path / "models" / "ssd.npz").is_file() and not (run.path / "models" / "cmg.npz").exists()
    seen = []
    train_run(cfg, progress=lambda s, d, t: seen.append((s, d)))
    run = Run.open(tmp_path / "r")
    assert run.status == "done"
    assert (run.path / "models" / "e1.npz").stat().st_mtime == e1_mtime  # E1 not retrained
    assert (run.path / "models" / "ssd.npz").stat().st_mtime == ssd_mtime  # finished method not retrained
    assert [d for s, d in seen if s == "E2 (cmg)"] == [3]  # resumed after epoch 2
    e2 = run.history().query("stage == 'e2'")
    assert sorted(e2[e2.method == "cmg"].epoch) == [1, 2, 3]  # no duplicated epochs


def test_changed_config_in_same_folder_is_refused(tmp_path):
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=x"])
    (tmp_path / "x").mkdir()
    other = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=x", "e2.epochs=2"])
    from cmg_core.config import save_config

    save_config(other, tmp_path / "x" / "config.yaml")
    with pytest.raises(ConfigError, match="different config"):
        train_run(cfg)


def test_too_many_gmm_clusters(tmp_path):
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=k", "data.options={n_per_class: 5, classes: 3}",
                                                 "task.normal_classes=[circle]", "cmle.n_clusters=10", "e1.epochs=1",
                                                 "cmer.rid_epochs=1", "e2.epochs=1", "e2.n_views=1", "train.methods=[cmg]"])
    with pytest.raises(ConfigError, match="n_clusters=10"):
        train_run(cfg)


@pytest.mark.parametrize("stage, stop_at, total", [("E1", 3, 5), ("RID", 4, 6)])
def test_e1_and_rid_resume_from_epoch_checkpoints(tmp_path, stage, stop_at, total):
    """The stage under test runs `total` epochs and is interrupted after `stop_at`; the other stage and E2 are
    as short as they go (what is checked is only the interrupted stage's epochs)."""
    epochs = {"E1": "e1.epochs", "RID": "cmer.rid_epochs"}[stage]
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=r", *SMALL, "train.methods=[ssd+er]",
                                                 "e1.epochs=2", "cmer.rid_epochs=2", f"{epochs}={total}",
                                                 "e2.epochs=1", "e2.n_views=1"])

    class Stop(Exception):
        pass

    def interrupt(s, done, t):
        if s == stage and done == stop_at:
            raise Stop()

    with pytest.raises(Stop):
        train_run(cfg, progress=interrupt)
    seen = []
    train_run(cfg, progress=lambda s, d, t: seen.append((s, d)))
    assert [d for s, d in seen if s == stage] == list(range(stop_at + 1, total + 1))  # continued, not restarted
    hist = Run.open(tmp_path / "r").history()
    assert sorted(hist[hist.stage == stage.lower()].epoch) == list(range(1, total + 1))  # each epoch once


@pytest.mark.parametrize("fixture", ["small_run", "small_pixel_run"])
def test_run_and_predictor_agree(request, fixture):
    """For both mask placements (cmer.apply), the Predictor (new images, no captions) reproduces the run's own
    RID choices and scores, so uploads are masked and scored exactly as the training/test images were."""
    from cmg_core.predict import Predictor

    run = request.getfixturevalue(fixture)
    images, scores, cmer = run.images(), run.scores(), run.cmer()
    test = np.flatnonzero((images.role == "test").values)[:6]
    pred = Predictor.load(run.path)
    res = pred.explain_many(list(images.path.values[test]))
    assert [r["rid_choice"] for r in res] == list(cmer.rid_choice.values[test])
    for m in ("ssd+er", "cmg", "cmg@knn", "raw", "raw@knn"):
        got = np.array([r["scores"][m] for r in res])
        np.testing.assert_allclose(got, scores[f"score_{m}"].values[test], rtol=2e-3, atol=1e-3)


def test_mask_apply_option():
    with pytest.raises(ConfigError, match="cmer.apply"):
        load_config("configs/synthetic.yaml", ["cmer.apply=blur"])
    with pytest.raises(ConfigError, match="cmer.apply=feature"):
        load_config("configs/synthetic.yaml", ["model.profile=end2end", "e1.encoder=end2end", "cmer.apply=feature",
                                               "train.methods=[ssd]"])
    with pytest.raises(ConfigError, match="method raw scores the frozen trunk"):  # there is no frozen trunk
        load_config("configs/synthetic.yaml", ["model.profile=end2end", "e1.encoder=end2end"])
    from cmg_core.config import mask_apply

    assert mask_apply(load_config("configs/synthetic.yaml")) == "feature"
    assert mask_apply(load_config("configs/synthetic.yaml", ["model.profile=end2end"])) == "feature"  # frozen E1
    assert mask_apply(load_config("configs/synthetic.yaml", ["model.profile=end2end", "e1.encoder=end2end",
                                                             "train.methods=[ssd]"])) == "pixel"
    assert mask_apply(load_config("configs/synthetic.yaml", ["cmer.apply=pixel"])) == "pixel"


def test_run_folder_models_load_without_pickle_and_old_folders_are_upgraded(small_run, tmp_path, capsys):
    """models/*.npz open with allow_pickle=False; a folder of pickled .pt files (older versions) is refused with
    a message naming `cmg upgrade`, which converts it (only with --trust) and calibrates its thresholds."""
    import shutil

    import torch

    from cmg_core.artifacts import load_model
    from cmg_core.detector import MahalanobisDetector
    from cmg_core.errors import DataError
    from cmg_core.predict import Predictor

    for f in (small_run.path / "models").iterdir():
        assert f.suffix == ".npz"
        with np.load(f, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)
    old = tmp_path / "old"
    shutil.copytree(small_run.path, old)
    for f in (old / "models").glob("*.npz"):  # rewrite as an older version did: one pickle per model
        weights, dets, meta = load_model(f)
        if f.stem == "rid":
            state = weights
        elif f.stem == "e1":
            state = {p: {k[len(p) + 1:]: v for k, v in weights.items() if k.startswith(p + ".")}
                     for p in ("image", "text")}
        else:
            d = dets["mahalanobis"]
            legacy = {k: d[k] for k in ("n_clusters", "covariance", "seed", "mean_", "std_", "means_", "train_scores_")}
            legacy["precisions_"] = d["precisions_"] if "precisions_" in d else np.stack([  # dense, as then
                a * np.eye(w.shape[1]) + s * w.T @ w for a, s, w in zip(d["alphas_"], d["signs_"], d["factors_"])])
            state = {"model": weights, "detector": legacy, "method": meta["method"], "text_dim": meta["text_dim"]}
        torch.save(state, f.with_suffix(".pt"))
        f.unlink()
    with pytest.raises(DataError, match="cmg upgrade"):
        Predictor.load(old)
    assert main(["upgrade", str(old)]) == 2  # without --trust nothing is unpickled
    assert main(["upgrade", str(old), "--trust"]) == 0
    assert not list((old / "models").glob("*.pt"))
    pred = Predictor.load(old)
    fresh = Predictor.load(small_run.path)
    for m in pred.methods:
        det, ref = pred.detectors[m], fresh.detectors[m]
        assert det.calibrated_ and isinstance(det, MahalanobisDetector)
        assert det.threshold_ == pytest.approx(ref.threshold_, rel=1e-3)  # the same cross-fitting, from embeddings
    img = small_run.images().path.iloc[-1]
    ref = fresh.explain(img)["scores"]  # old folders held Mahalanobis detectors only: no `<method>@knn` keys
    assert pred.methods == [m for m in ref if "@" not in m]
    assert pred.explain(img)["scores"] == pytest.approx({m: ref[m] for m in pred.methods}, rel=1e-5)
