"""The `paper` profile (cmg_core.paper): end-to-end ResNets on a tiny synthetic task, run folder, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cmg_core.config import load_config
from cmg_core.losses import nt_xent_loss
from cmg_core.paper import PaperPredictor, PaperRun, batch_simclr_augment, nt_xent_ids, train_paper_run
from cmg_core.runs import RUN_FILES, Run, method_slug

# 20 normal images (16 train) + 20 anomalies, 32 px, standard ResNet-18 stem: about 5 s per E2 epoch on 2 cores
TINY = ["data.options={n_per_class: 10, classes: 4}", "data.image_size=32", "model.cifar_stem=false",
        "task.normal_classes=[circle, square]", "e1.epochs=2", "e1.batch_size=16", "cmer.rid_epochs=5",
        "cmle.n_clusters=2", "cmle.n_neighbors=3", "e2.epochs=2", "e2.batch_size=16",
        "train.methods=[ssd, cmg, cmg-mse]", "train.device=cpu"]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run interrupted after E1's first epoch, run again and interrupted after E2 (ssd)'s first epoch,
    then run a third time to the end."""
    out = tmp_path_factory.mktemp("paper_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMG_CACHE_DIR", str(out / "cache"))
        cfg = load_config("configs/synthetic_paper.yaml", [f"out_dir={out}", "name=tiny", *TINY])
        run_dir = out / "tiny"
        second = []

        def stop_at(where, calls):
            def cb(stage, done, total):
                calls.append((stage, done, total))
                if (stage, done) == where:
                    raise _Stop
            return cb

        with pytest.raises(_Stop):
            train_paper_run(cfg, progress=stop_at(("E1", 1), []))
        e1_ckpt = torch.load(run_dir / "checkpoints" / "e1.pt", weights_only=False)["epoch"]
        with pytest.raises(_Stop):
            train_paper_run(cfg, progress=stop_at(("E2 (ssd)", 1), second))
        first = {"info": json.loads((run_dir / "run.json").read_text()), "e1_ckpt_epoch": e1_ckpt,
                 "ckpt_epoch": torch.load(run_dir / "checkpoints" / "e2_ssd.pt", weights_only=False)["epoch"],
                 "has_ssd_model": (run_dir / "models" / "ssd.pt").exists(), "second": second,
                 "e1_mtime": (run_dir / "models" / "e1.pt").stat().st_mtime,
                 "rid_mtime": (run_dir / "models" / "rid.pt").stat().st_mtime}
        calls = []
        train_paper_run(cfg, progress=lambda s, d, t: calls.append((s, d, t)))
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
    assert (run.path / "models" / "e1.pt").stat().st_mtime == first["e1_mtime"]
    assert (run.path / "models" / "rid.pt").stat().st_mtime == first["rid_mtime"]
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
    assert run.status == "done" and run.info["profile"] == "paper"
    images, scores, cmer = run.images(), run.scores(), run.cmer()
    n = len(images)
    assert n == 40 and len(scores) == n and len(cmer) == n and (images.role == "train").sum() == 16
    assert {f"e1_score_{j}" for j in range(4)} <= set(cmer.columns) and cmer.rid_choice.between(0, 3).all()
    metrics = run.metrics()
    assert set(metrics) == set(run.methods) == {"ssd", "cmg", "cmg-mse"}
    for m in run.methods:
        assert np.isfinite(scores[f"score_{m}"].values).all()
        emb = run.embeddings(m)
        assert emb.shape == (n, 512) and np.isfinite(emb).all()
        assert set(metrics[m]) == {"auroc", "aupr", "fpr95"}
        assert (run.path / "models" / f"{method_slug(m)}.pt").is_file()
    hist = run.history()
    assert set(hist.stage) == {"e1", "rid", "e2"}
    e2 = hist[hist.stage == "e2"]
    assert e2.auroc.notna().all() and np.isfinite(e2[["loss", "simclr", "global", "mse"]].values).all()
    cmg = e2[e2.method == "cmg"]
    assert (cmg["global"] > 0).all() and (e2[e2.method == "ssd"]["global"] == 0).all()
    assert (e2[e2.method == "cmg-mse"]["mse"] > 0).all()


def test_predictor_scores_new_images(resumed):
    run, _, _ = resumed
    pred = PaperPredictor.load(run.path)
    assert pred.methods == run.methods
    images = run.images()
    res = pred.explain_many(list(images.path[:2]))
    assert len(res) == 2 and len(res[0]["variants"]) == 4 and 0 <= res[0]["rid_choice"] < 4
    assert set(res[0]["scores"]) == set(run.methods) and all(np.isfinite(v) for v in res[0]["scores"].values())
    # the stored scores of those rows are reproduced (same preprocessing as training)
    stored = run.scores()["score_ssd"].values[:2]
    assert np.allclose(pred.score(list(images.path[:2]), "ssd"), stored, rtol=1e-3, atol=1e-3)


def test_other_config_in_the_same_folder_is_refused(resumed):
    from cmg_core.errors import ConfigError

    run, _, _ = resumed
    cfg = load_config(run.path / "config.yaml", ["e2.epochs=3"])
    with pytest.raises(ConfigError, match="different config"):
        PaperRun(cfg)


# --- pieces -----------------------------------------------------------------------------------------

def test_batch_augment_is_per_image_and_seeded():
    x = torch.rand(6, 3, 16, 16)
    a = batch_simclr_augment(x, torch.Generator().manual_seed(1))
    b = batch_simclr_augment(x, torch.Generator().manual_seed(1))
    c = batch_simclr_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = batch_simclr_augment(x[:1].expand(6, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    assert not torch.allclose(same[0], same[1])  # every image draws its own parameters


def test_nt_xent_ids_matches_nt_xent_and_drops_duplicate_negatives():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.allclose(nt_xent_ids(z1, z2, torch.arange(5), 0.5), nt_xent_loss(z1, z2, 0.5), atol=1e-6)
    dup = torch.tensor([0, 1, 2, 3, 0])  # image 0 twice: its other copy is not a negative
    assert not torch.allclose(nt_xent_ids(z1, z2, dup, 0.5), nt_xent_loss(z1, z2, 0.5))


def test_neighbour_aware_batches_hold_most_neighbours():
    rng = np.random.default_rng(0)
    n, k = 60, 4
    rows = np.repeat(np.arange(n), k)
    cols = np.concatenate([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    w = sp.csr_matrix((np.full(n * k, 1 / k), (rows, cols)), shape=(n, n))
    shard = list(rng.permutation(n))
    batches = PaperRun._e2_batches(shard, 20, w, n_seed=4)
    assert len(batches) == 3  # as many steps as a plain epoch
    for bt in batches:
        assert len(bt) <= 20 and len(set(bt.tolist())) == len(bt)
        for seed in bt[:4]:
            assert set(w[seed].indices) <= set(bt.tolist())  # the seeds' neighbours are all in the batch
    plain = PaperRun._e2_batches(shard, 16, None, 0)
    assert [len(b) for b in plain] == [16, 16, 16, 12]


@pytest.mark.parametrize("name", ["synthetic_paper", "ucm_captions_paper"])
def test_paper_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.profile == "paper" and cfg.model.backbone.startswith("resnet")
