"""`cmg experiment` on a tiny synthetic set: table with CIs, resume without retraining, analysis data."""
import json

import numpy as np
import pandas as pd
import pytest

from cmg_core.config import load_config
from cmg_core.experiment import markdown_table, run_experiment, significance_of, summarize
from cmg_core.metrics import mean_ci
from cmg_core.significance import COLUMNS

TINY = ["data.options={n_per_class: 12, classes: 4}", "data.image_size=64", "task.normal_classes=null",
        "task.n_normal=2", "e1.epochs=2", "cmer.rid_epochs=2", "e2.epochs=2", "e2.n_views=1", "model.head_hidden=64",
        "experiment.task_seeds=[0, 1]", "experiment.dcor_samples=20", "experiment.dcor_pixels=8",
        "cmle.n_clusters=2"]  # 2 normal classes; 5 caption clusters of ~19 images leave 2-image clusters (slow to score)


def test_summary_uses_t_interval():
    per_task = pd.DataFrame({"method": ["a"] * 3, "auroc": [90.0, 92.0, 97.0], "aupr": [1.0, 2.0, 3.0],
                             "fpr95": [5.0, 5.0, 5.0]})
    s = summarize(per_task).iloc[0]
    mean, hw = mean_ci(np.array([90.0, 92.0, 97.0]))
    assert s.auroc == pytest.approx(93.0) and s.auroc_ci95 == pytest.approx(hw) and hw > 0
    assert "93.00 ±" in markdown_table(summarize(per_task))


def test_tiny_experiment_resumes_and_writes_analyses(tmp_path, monkeypatch):
    import cmg_core.figures as figures

    real_embed = figures.embed_2d
    # UMAP itself is checked by test_app.py::test_embed_2d_shapes_and_errors; here (where numba is off, conftest)
    # its 500 layout epochs in plain Python would be half of this test, so its maps are t-SNE's
    monkeypatch.setattr(figures, "embed_2d", lambda X, method="tsne", seed=0: real_embed(X, "tsne", seed))
    cfg = load_config("configs/synthetic.yaml", [f"experiment.out_dir={tmp_path}", "name=exp", *TINY])
    logs = []
    exp = run_experiment(cfg, log=logs.append)
    per_task = pd.read_csv(exp / "results.csv")
    assert sorted(per_task.seed.unique()) == [0, 1]
    assert set(per_task.method) == {"raw", "ssd", "ssd+er", "ssd+le[lle]", "cmg[lle]", "cmg-mse"}  # with the reading
    assert (per_task.groupby("method").scorer.apply(set) == {"mahalanobis", "knn"}).all()  # each scored both ways
    table = markdown_table(summarize(per_task)).splitlines()
    assert table[2].startswith("| raw | mahalanobis |") and table[8].startswith("| raw | knn |")
    summary = pd.read_csv(exp / "summary.csv")
    assert {"auroc", "auroc_ci95", "aupr_ci95", "fpr95_ci95"} <= set(summary.columns)
    assert "±" in (exp / "results.md").read_text()
    paired = pd.read_csv(exp / "significance.csv")  # 12 scored keys: 11 against ssd, 10 more against raw@knn
    assert list(paired.columns) == list(COLUMNS) and len(paired) == 21 and (paired.n == 2).all()
    assert {"raw@knn", "cmg[lle]", "cmg[lle]@knn"} <= set(paired.query("reference == 'ssd'").method)
    assert "## Paired comparisons (AUROC)" in (exp / "results.md").read_text()
    numbers = [c for c in COLUMNS if c != "note"]
    pd.testing.assert_frame_equal(significance_of(exp)[numbers], paired[numbers])
    # different seeds draw different normal classes
    normals = [json.loads((exp / f"task_seed{s}" / "run.json").read_text())["normal_classes"] for s in (0, 1)]
    assert normals[0] != normals[1]
    for fig in ("fig1", "fig5", "fig6", "fig7", "fig8", "fig9", "fig10", "experiment"):
        assert (exp / "analysis" / f"{fig}.json").is_file(), fig
    fig1 = json.loads((exp / "analysis" / "fig1.json").read_text())
    assert 0 <= fig1["caption"]["v_measure"] <= 1 and 0 <= fig1["image"]["linear_probe_acc"] <= 1
    fig5 = json.loads((exp / "analysis" / "fig5.json").read_text())
    assert fig5["names"][0] == "raw images" and np.allclose(np.diag(fig5["matrix"]), 1)
    fig9 = json.loads((exp / "analysis" / "fig9.json").read_text())
    assert {r["mask"] for r in fig9} == {"hard", "soft"}
    assert (exp / "task_seed0" / "analysis" / "latent.json").is_file()
    # bench/ucm_diagnostics.py: its one-Gaussian scores of each method reproduce the run's own AUROC
    import importlib.util

    from cmg_core.runs import Run

    spec = importlib.util.spec_from_file_location("ucm_diagnostics", "bench/ucm_diagnostics.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    d = diag.task_diagnostics(Run.open(exp / "task_seed0"))
    for m, label in (("ssd", "ssd"), ("cmg", "cmg[lle]")):
        reported = per_task.query("seed == 0 and method == @label and scorer == 'mahalanobis'").auroc.item()
        assert d[f"{m} k1"] == pytest.approx(reported, abs=1e-6)
    raw_knn = per_task.query("seed == 0 and method == 'raw' and scorer == 'knn'").auroc.item()
    assert d["raw knn5"] == pytest.approx(raw_knn, abs=1e-6)  # the bench's k-NN is the detector's
    assert 0 <= d["LLE weight on own class"] <= 100
    assert all(0 <= d[f"raw drop {r}"] <= 100 for r in ("cmer", "rid", "random", "worst"))
    # rerun: nothing is retrained
    logs.clear()
    run_experiment(cfg, log=logs.append, analyses=False)
    assert sum("reused" in line for line in logs) == 4 and not any("trained in" in line for line in logs)
