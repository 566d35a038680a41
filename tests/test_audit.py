"""`cmg audit` (cmg_core.audit): rows, which runs a departure retrains, and a tiny audit end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cmg_core.audit import audit_rows, run_audit, variant
from cmg_core.audit_report import AUDIT_METHODS
from cmg_core.config import load_config
from cmg_core.errors import ConfigError
from cmg_core.protocol import Scoring
from cmg_core.train.evaluate import history_records

TINY = ["data.options={n_per_class: 12, classes: 4}", "model.backbone=cnn", "model.width=8", "e2.epochs=2",
        "train.device=cpu", "detector.calibration_folds=2", "experiment.task_seeds=[0]"]


def test_rows_alone_then_cumulative():
    rows = audit_rows(["best_epoch", "test_captions", "bn_train", "supcon_batch", "anomalies_unmasked"])
    assert [r.label for r in rows] == ["honest protocol", "best_epoch", "test_captions", "bn_train", "supcon_batch",
                                       "anomalies_unmasked", "+ test_captions", "+ bn_train", "+ supcon_batch",
                                       "+ anomalies_unmasked"]
    by = {r.label: r for r in rows}
    assert by["honest protocol"].scoring == Scoring() and not by["honest protocol"].best
    assert by["bn_train"].scoring == Scoring(bn="train") and not by["bn_train"].best
    assert by["+ bn_train"].scoring == Scoring("captions", "same", "train") and by["+ bn_train"].best
    assert by["supcon_batch"].train == ("supcon_batch",) and by["supcon_batch"].scoring == Scoring()
    assert by["+ anomalies_unmasked"].scoring == Scoring("captions", "none", "train")
    assert by["+ anomalies_unmasked"].train == ("supcon_batch",)
    with pytest.raises(ConfigError, match="unknown departure"):
        audit_rows(["peeking"])


def test_a_training_departure_retrains_only_the_methods_it_changes():
    train = ("supcon_batch", "released_epochs")
    assert variant("ssd", train) == ("released_epochs",)
    assert variant("cmg[supcon]", train) == ("supcon_batch",) and variant("ssd+le[supcon]", train) == ("supcon_batch",)
    assert variant("cmg[lle]", train) == () and variant("cmda", train) == ()
    assert variant("cmda", ("caption_items",)) == ("caption_items",)


def test_tiny_audit_end_to_end(tmp_path):
    cfg = load_config("configs/synthetic_end2end.yaml", [*TINY, f"experiment.out_dir={tmp_path}", "name=tiny"])
    names = ["best_epoch", "test_captions", "bn_train", "supcon_batch", "released_epochs"]
    out = run_audit(cfg, departures=names, log=lambda *_: None)
    per_task = pd.read_csv(out / "audit.csv")
    assert set(per_task.method) == set(AUDIT_METHODS) and len(per_task) == len(AUDIT_METHODS) * len(audit_rows(names))
    honest_dir = out / "task_seed0"
    metrics = json.loads((honest_dir / "metrics.json").read_text())
    honest = per_task[per_task.row == "honest protocol"].set_index("method")
    best = per_task[per_task.row == "best_epoch"].set_index("method")
    for m in AUDIT_METHODS:
        assert honest.loc[m, "reported"] == pytest.approx(metrics[m]["auroc"])  # the final epoch, as the run reports
        values = [r["auroc"] for r in history_records(honest_dir, m)]
        assert best.loc[m, "reported"] == pytest.approx(max(values))
        assert honest.loc[m, "epoch1"] == pytest.approx(values[0])
    ssd_runs = out / "task_seed0__released_epochs"
    assert [r["epoch"] for r in history_records(ssd_runs, "ssd")] == [1, 2, 3, 4, 5]  # 2.5 x e2.epochs
    assert json.loads((ssd_runs / "run.json").read_text())["methods"] == ["ssd"]
    supcon = out / "task_seed0__supcon_batch"
    assert sorted(json.loads((supcon / "run.json").read_text())["methods"]) == ["cmg[supcon]", "ssd+le[supcon]"]
    for name in ("e1.npz", "rid.npz"):  # the retrained methods see the honest run's E1 and RID
        assert (supcon / "models" / name).read_bytes() == (honest_dir / "models" / name).read_bytes()
    cum = per_task[per_task.row == "+ released_epochs"].set_index("method")
    ssd_hist = [r["auroc|masks=captions,bn=train"] for r in history_records(ssd_runs, "ssd")]
    assert cum.loc["ssd", "reported"] == pytest.approx(max(ssd_hist))
    text = (out / "audit.md").read_text()
    assert "honest protocol" in text and "paper (Table I/II)" in text and "99.71" in text
    fig = json.loads((out / "fig10.json").read_text())
    assert {"honest protocol", "best_epoch", "+ released_epochs"} <= set(fig["rows"])
    band = fig["rows"]["honest protocol"]["cmg[supcon]"]
    assert band["epoch"] == [1, 2] and np.isfinite(band["mean"]).all()
    again = run_audit(cfg, departures=names, log=lambda *_: None)  # everything reused
    pd.testing.assert_frame_equal(pd.read_csv(again / "audit.csv"), per_task)
