"""Paired comparisons over tasks (cmg_core/significance.py) against scipy, numpy and a hand-worked Holm example."""
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cmg_core.errors import DataError
from cmg_core.significance import COLUMNS, compare_pair, holm_adjust, paired_comparisons, significance_markdown

SEEDS = [0, 1, 2, 3, 4]
AUROC = {  # per scored key, one value per task: the shape of results.csv (method label + scorer)
    ("ssd", "mahalanobis"): [80.0, 82.5, 79.0, 85.0, 81.0],
    ("raw", "knn"): [70.0, 71.0, 74.5, 69.0, 72.0],
    ("cmg[lle]", "mahalanobis"): [84.0, 83.0, 85.5, 86.0, 80.0],
}


def results_frame(values=AUROC) -> pd.DataFrame:
    return pd.DataFrame([{"seed": s, "wall_time_s": 1.0, "method": m, "scorer": sc, "auroc": v[i],
                          "aupr": v[i] - 5, "fpr95": 100 - v[i]}
                         for (m, sc), v in values.items() for i, s in enumerate(SEEDS)])


def test_holm_hand_worked():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm_adjust([0.5, np.nan, 0.4, 0.01])  # NaN kept, K = 3 non-NaN values
    assert np.isnan(out[1]) and out[[0, 2, 3]] == pytest.approx([0.8, 0.8, 0.03])
    assert holm_adjust([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]).shape == (0,)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        holm_adjust([0.2, 1.5])


def test_paired_comparisons_match_scipy_and_numpy():
    df = paired_comparisons(results_frame())
    assert list(df.columns) == list(COLUMNS)
    # ssd block: raw@knn and cmg[lle]; raw@knn block: cmg[lle] only (ssd vs raw@knn is listed once)
    assert list(zip(df.reference, df.method)) == [("ssd", "raw@knn"), ("ssd", "cmg[lle]"), ("raw@knn", "cmg[lle]")]
    key = {"ssd": ("ssd", "mahalanobis"), "raw@knn": ("raw", "knn"), "cmg[lle]": ("cmg[lle]", "mahalanobis")}
    for r in df.itertuples():
        a, b = np.array(AUROC[key[r.method]]), np.array(AUROC[key[r.reference]])
        d = a - b
        half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
        assert r.n == 5 and r.metric == "auroc" and r.note == ""
        assert r.mean_diff == pytest.approx(d.mean())
        assert (r.ci95_low, r.ci95_high) == pytest.approx((d.mean() - half, d.mean() + half))
        assert r.wilcoxon_p == stats.wilcoxon(a, b).pvalue
        assert r.ttest_p == stats.ttest_rel(a, b).pvalue
    assert df.wilcoxon_p.min() == pytest.approx(0.0625)  # n = 5: the smallest two-sided exact p
    assert df.wilcoxon_p_holm.to_numpy() == pytest.approx(holm_adjust(df.wilcoxon_p.to_numpy()))
    assert df.ttest_p_holm.to_numpy() == pytest.approx(holm_adjust(df.ttest_p.to_numpy()))
    fpr = paired_comparisons(results_frame(), metric="fpr95")
    assert fpr.mean_diff.to_numpy() == pytest.approx(-df.mean_diff.to_numpy())


def test_paired_tasks_are_those_with_both_values():
    frame = results_frame()
    frame.loc[(frame.method == "cmg[lle]") & (frame.seed == 2), "auroc"] = np.nan
    frame = frame[~((frame.method == "ssd") & (frame.seed == 4))]  # a task without ssd
    r = paired_comparisons(frame, references=("ssd",)).set_index("method").loc["cmg[lle]"]
    a, b = np.array(AUROC[("cmg[lle]", "mahalanobis")])[[0, 1, 3]], np.array(AUROC[("ssd", "mahalanobis")])[[0, 1, 3]]
    assert r.n == 3 and r.mean_diff == pytest.approx((a - b).mean())
    assert r.wilcoxon_p == stats.wilcoxon(a, b).pvalue and r.ttest_p == stats.ttest_rel(a, b).pvalue


def test_degenerate_cases_neither_raise_nor_warn():
    values = {("ssd", "mahalanobis"): [80.0, 81.0, 82.0, 83.0, 84.0],
              ("same", "mahalanobis"): [80.0, 81.0, 82.0, 83.0, 84.0],  # all differences zero
              ("shifted", "mahalanobis"): [81.0, 82.0, 83.0, 84.0, 85.0],  # constant differences
              ("once", "mahalanobis"): [90.0, np.nan, np.nan, np.nan, np.nan]}  # one paired task
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = paired_comparisons(results_frame(values)).set_index("method")  # raw@knn absent: skipped
        assert set(df.reference) == {"ssd"} and "ssd" not in df.index  # nor ssd against itself
        same, shifted, once = df.loc["same"], df.loc["shifted"], df.loc["once"]
        assert same.wilcoxon_p == 1.0 and same.ttest_p == 1.0 and "all paired differences are zero" in same.note
        assert (same.ci95_low, same.ci95_high) == (0.0, 0.0)
        assert shifted.wilcoxon_p == stats.wilcoxon([1.0] * 5).pvalue and np.isnan(shifted.ttest_p)
        assert "zero variance" in shifted.note and np.isnan(shifted.ttest_p_holm)
        assert once.n == 1 and once.mean_diff == 10.0 and "too few tasks" in once.note
        assert np.isnan([once.ci95_low, once.wilcoxon_p, once.ttest_p, once.wilcoxon_p_holm]).all()
        assert compare_pair(np.array([]), np.array([]))["n"] == 0
        empty = paired_comparisons(results_frame({("cmg", "mahalanobis"): [1.0] * 5}))
        assert empty.empty and list(empty.columns) == list(COLUMNS)
        assert "No paired comparisons" in significance_markdown(empty)
        md = significance_markdown(df.reset_index())
    assert "| once | ssd | 1 | +10.00 | – | – |" in md


def test_bad_per_task_tables():
    with pytest.raises(DataError, match="no column"):
        paired_comparisons(results_frame().drop(columns="seed"))
    with pytest.raises(DataError, match="more than one"):
        paired_comparisons(pd.concat([results_frame(), results_frame().iloc[:1]]))


def test_markdown_section():
    md = significance_markdown(paired_comparisons(results_frame()))
    print(md)
    lines = md.splitlines()
    assert lines[0] == "## Paired comparisons (AUROC)"
    assert "0.0625" in md and "no comparison over 5 tasks can reach p < 0.05 by Wilcoxon" in md
    assert lines[-3].startswith("| raw@knn | ssd | 5 | -10.20 | [")
    assert len([line for line in lines if line.startswith("| ")]) == 4  # header + 3 comparisons
