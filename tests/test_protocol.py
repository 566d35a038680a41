"""The protocol section's departures (cmg_core.protocol): each switch does what it says, and only when on."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cmg_core.cmle import batch_caption_clusters
from cmg_core.config import load_config
from cmg_core.errors import ConfigError
from cmg_core.losses import supcon_loss
from cmg_core.methods import parse_method
from cmg_core.protocol import Scoring, class_pure_groups, departures, run_scoring, scoring_masks
from cmg_core.train import train_run
from cmg_core.train.evaluate import history_records, scored_features
from cmg_core.train.nets import bn_train_copy
from cmg_core.train.objective import Guidance, e2_step_loss

# a tiny end2end task: 28 normal images (22 train) + 28 anomalies, a small CNN, 3 E2 epochs (seconds on 2 cores)
TINY = ["data.options={n_per_class: 14, classes: 4}", "model.backbone=cnn", "model.width=8", "e2.epochs=3",
        "train.device=cpu", 'train.methods=[ssd, ssd+er, "cmg[supcon]"]', "detector.calibration_folds=2"]
EXTRA = (Scoring("rid_test"), Scoring("captions"), Scoring("captions", bn="train"),
         Scoring("captions", "none", "train"))


def _run(out, name, *overrides, extra=()):
    cfg = load_config("configs/synthetic_end2end.yaml", [*TINY, f"out_dir={out}", f"name={name}", *overrides])
    return train_run(cfg, extra_scorings=extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    departed = _run(out, "departed", "protocol={test_masks: captions, report_epoch: best}", "train.methods=[ssd, ssd+er]")
    return {"plain": _run(out, "plain"), "audited": _run(out, "audited", extra=EXTRA), "captions": departed,
            "best": departed}


# --- pure rules ---------------------------------------------------------------------------------------------

def test_scoring_masks_follow_the_rule():
    choices = {"rid": np.array([0, 1, 2, 3]), "captions": np.array([3, 3, 3, 3]), "rid_test": np.array([1, 1, 1, 1])}
    y = np.array([0, 0, 1, 1])
    assert scoring_masks(Scoring(), True, choices, y).tolist() == [0, 1, 2, 3]
    assert scoring_masks(Scoring("captions"), True, choices, y).tolist() == [3, 3, 3, 3]
    assert scoring_masks(Scoring("rid", "none"), True, choices, y).tolist() == [0, 1, -1, -1]
    assert scoring_masks(Scoring("captions", "rid"), True, choices, y).tolist() == [3, 3, 2, 3]
    assert scoring_masks(Scoring(), False, choices, y) is None  # a method without ER masks nothing
    assert scoring_masks(Scoring("rid", "captions"), False, choices, y).tolist() == [-1, -1, 3, 3]
    assert class_pure_groups(2, y).tolist() == [0, 0, 2, 2] and class_pure_groups(1, np.array([0, 0, 1])).tolist() == [0, 1, 2]


def test_protocol_section_defaults_and_words():
    cfg = load_config("configs/synthetic.yaml")
    assert run_scoring(cfg.protocol) == Scoring() and departures(cfg.protocol) == []
    cfg = load_config("configs/synthetic.yaml", ["protocol={test_masks: captions, rid_select: test, bn_mode: train}"])
    assert run_scoring(cfg.protocol) == Scoring("captions", "same", "train")
    assert any("uses test captions" in d for d in departures(cfg.protocol))
    for bad in ("protocol.test_masks=all", "protocol.report_epoch=max", "protocol.method_epochs={ssd: 0}",
                "protocol.method_epochs={nope: 3}", "protocol.method_epochs=7", "train.eval_every=0"):
        with pytest.raises(ConfigError):
            load_config("configs/synthetic.yaml", [bad])


def test_bn_train_copy_changes_features_only_through_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3), model[1].running_var.fill_(2.0)
    x = torch.randn(16, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = bn_train_copy(model)(x)
        again = bn_train_copy(model)(x)
    a = x.numpy() @ model[0].weight.detach().numpy().T + model[0].bias.detach().numpy()
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + model[1].eps)  # the batch's own (biased) statistics
    a = a * model[1].weight.detach().numpy() + model[1].bias.detach().numpy()
    ref = np.maximum(a, 0) @ model[4].weight.detach().numpy().T + model[4].bias.detach().numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)  # dropout off, batch statistics on
    assert torch.equal(out, again) and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself untouched
    plain = nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5)).eval()
    with torch.no_grad():
        assert torch.equal(bn_train_copy(plain)(x), plain(x))  # no BatchNorm: nothing changes


def test_bn_train_scoring_uses_class_pure_batches():
    calls = []

    class Backend:
        def embed(self, model, spec, rows=None, masks=None, bn="eval"):
            calls.append((bn, list(rows)))
            return np.asarray(rows, dtype=float)[:, None].repeat(2, 1)

    class FakeRun:
        rows = np.arange(7)
        n_train = 3
        is_anomaly = np.array([0, 0, 0, 0, 1, 0, 1])

        def scoring_masks(self, spec, scoring):
            return None

    h = scored_features(FakeRun(), Backend(), None, parse_method("ssd"), Scoring(bn="train"))
    assert [c[1] for c in calls] == [[0, 1, 2], [3, 5], [4, 6]] and all(c[0] == "train" for c in calls)
    np.testing.assert_array_equal(h[:, 0], np.arange(7))


def test_supcon_labels_refitted_per_batch_match_a_gmm_of_the_batch():
    torch.manual_seed(0)
    source = torch.randn(12, 8)
    ids = torch.tensor([0, 3, 4, 7, 8, 11])
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    g = Guidance(batch_cluster_source=source, batch_clusters=3, batch_cluster_seed=1, supcon_temperature=0.5)
    loss, parts = e2_step_loss(g, ids, z1, z2, 0.5)
    labels = torch.from_numpy(batch_caption_clusters(source[ids].numpy(), 3, seed=1))
    assert loss.item() == pytest.approx(supcon_loss(z1, z2, labels, 0.5).item(), rel=1e-6)
    assert parts["simclr"] == 0.0 and parts["global"] == pytest.approx(loss.item())
    assert len(batch_caption_clusters(np.random.default_rng(0).normal(size=(2, 4)), 5)) == 2  # K capped at B


# --- switches in real runs ----------------------------------------------------------------------------------

def test_default_run_is_unchanged_by_extra_scorings(runs):
    plain, audited = runs["plain"], runs["audited"]
    a, b = pd.read_csv(plain / "scores.csv"), pd.read_csv(audited / "scores.csv")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((plain / "metrics.json").read_text()) == json.loads((audited / "metrics.json").read_text())
    info = json.loads((plain / "run.json").read_text())
    assert info["departures"] == []
    for method in ("ssd", "ssd+er", "cmg[supcon]"):
        ha, hb = history_records(plain, method), history_records(audited, method)
        assert [r["auroc"] for r in ha] == [r["auroc"] for r in hb]
        assert all(k in hb[0] for k in ("auroc|masks=captions", "auroc|masks=captions,bn=train"))


def test_test_masks_captions_masks_by_cmer_with_own_captions(runs):
    plain, cap = runs["plain"], runs["captions"]
    cmer = pd.read_csv(cap / "cmer.csv")
    e1 = cmer[[c for c in cmer.columns if c.startswith("e1_score_")]].to_numpy()
    np.testing.assert_array_equal(cmer.cmer_label, e1.argmax(1))  # CMER's argmax with each image's own captions
    differ = (cmer.cmer_label != cmer.rid_choice).to_numpy()
    assert differ.any() and not differ.all()
    er_plain, er_cap = np.load(plain / "embeddings" / "ssd_er.npy"), np.load(cap / "embeddings" / "ssd_er.npy")
    np.testing.assert_allclose(er_plain[~differ], er_cap[~differ], rtol=1e-5, atol=1e-6)
    assert not np.allclose(er_plain[differ], er_cap[differ])  # those rows got CMER's mask, not RID's
    np.testing.assert_allclose(np.load(plain / "embeddings" / "ssd.npy"), np.load(cap / "embeddings" / "ssd.npy"))
    assert any("uses test captions" in d for d in json.loads((cap / "run.json").read_text())["departures"])


def test_rid_selected_on_test_is_recorded(runs):
    cmer = pd.read_csv(runs["audited"] / "cmer.csv")
    assert "rid_test_choice" in cmer and (runs["audited"] / "models" / "rid_test.npz").is_file()
    assert "rid_test_choice" not in pd.read_csv(runs["plain"] / "cmer.csv")


def test_report_epoch_best_is_the_maximum_of_the_history(runs):
    best = runs["best"]
    met = json.loads((best / "metrics.json").read_text())
    hist = history_records(best, "ssd")
    assert len(hist) == 3
    for key, hkey in (("ssd", "auroc"), ("ssd@knn", "auroc@knn")):
        values = [r[hkey] for r in hist]
        assert met[key]["auroc"] == pytest.approx(max(values))
        assert met[key]["auroc_final"] == pytest.approx(values[-1])
        assert met[key]["best_epoch"] == 1 + int(np.argmax(values))
    assert any("maximum over epochs" in d for d in json.loads((best / "run.json").read_text())["departures"])


def test_method_epochs_and_caption_items(tmp_path, monkeypatch):
    from cmg_core.train import frozen

    seen = []
    real = frozen.batches
    monkeypatch.setattr(frozen, "batches", lambda n, *a, **k: seen.append(n) or real(n, *a, **k))
    cfg = load_config("configs/synthetic.yaml", [
        "data.options={n_per_class: 12, classes: 4}", "task.normal_classes=[circle, square]", "e1.epochs=2",
        "cmer.rid_epochs=2", "e2.epochs=2", "e2.n_views=2", "model.head_hidden=32", "train.methods=[ssd, ssd+er]",
        "protocol={method_epochs: {ssd: 3}, train_items: captions}", f"out_dir={tmp_path}", "name=r"])
    run = train_run(cfg)
    assert [r["epoch"] for r in history_records(run, "ssd")] == [1, 2, 3]
    assert [r["epoch"] for r in history_records(run, "ssd+er")] == [1, 2]
    images = pd.read_csv(run / "images.csv")
    n_train, n_caps = int((images.role == "train").sum()), len(images.captions[0].split(" | "))
    assert n_caps > 1 and set(seen) == {n_train * n_caps}  # every epoch passes each image once per caption
