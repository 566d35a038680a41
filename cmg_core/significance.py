"""Paired comparisons of methods over the tasks of an experiment: each method against a reference (`ssd`,
`raw@knn`) on the tasks both have a value for. Mean paired difference with its 95% t-interval, Wilcoxon
signed-rank and paired t-test p-values, Holm's step-down adjustment over the table's family of comparisons.
Pure functions, pandas / numpy in and out; no I/O.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .errors import DataError
from .methods import scored_key
from .metrics import mean_ci

REFERENCES = ("ssd", "raw@knn")
COLUMNS = ("reference", "method", "metric", "n", "mean_diff", "ci95_low", "ci95_high", "wilcoxon_p",
           "wilcoxon_p_holm", "ttest_p", "ttest_p_holm", "note")


def holm_adjust(p) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family. p: (K,) in [0, 1], NaN for a comparison without a
    p-value -> (K,): the NaNs where they were; of the other m values, the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) * p_(j)) (monotone in p, capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise DataError(f"holm_adjust takes a 1-D array of p-values, got shape {p.shape}")
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise DataError(f"p-values must lie in [0, 1], got {p[ok][(p[ok] < 0) | (p[ok] > 1)].tolist()}")
    q = p[ok]
    order = np.argsort(q, kind="stable")
    steps = np.maximum.accumulate((q.size - np.arange(q.size)) * q[order])
    adjusted = np.empty_like(q)
    adjusted[order] = np.minimum(steps, 1.0)
    out = p.copy()
    out[ok] = adjusted
    return out


def compare_pair(a: np.ndarray, b: np.ndarray) -> dict:
    """One method (a: (n,) finite values, one per task) against a reference (b: (n,), the same tasks):
    n, mean_diff (a - b), ci95_low / ci95_high (t-interval of the mean difference, `metrics.mean_ci`),
    wilcoxon_p (`scipy.stats.wilcoxon`, two-sided, exact for small n), ttest_p (`scipy.stats.ttest_rel`) and a
    note saying why a value is missing (NaN) or how a degenerate case was read; never raises or warns."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    nan = float("nan")
    row = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else nan, "ci95_low": nan, "ci95_high": nan,
           "wilcoxon_p": nan, "ttest_p": nan, "note": ""}
    if d.size < 2:
        return {**row, "note": f"too few tasks (n = {d.size} < 2)"}
    mean, half = mean_ci(d)
    row.update(ci95_low=mean - half, ci95_high=mean + half)
    if not np.any(d):  # scipy's Wilcoxon has no ranks and the t statistic is 0/0: no difference at all
        return {**row, "wilcoxon_p": 1.0, "ttest_p": 1.0, "note": "all paired differences are zero: p = 1"}
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row["wilcoxon_p"] = float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
        if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):  # equal up to float rounding
            notes.append("constant differences: t-test undefined (zero variance)")
        else:
            row["ttest_p"] = float(stats.ttest_rel(a, b, alternative="two-sided").pvalue)
    notes += [f"scipy warned: {w.message}" for w in caught]
    return {**row, "note": "; ".join(notes)}


def task_table(per_task: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The per-task frame of an experiment (results.csv / analysis/experiment.json: columns seed, method, scorer
    (optional: Mahalanobis when absent) and `metric`, one row per task and scored method) as a (tasks, keys)
    table of `metric`: index seed, one column per scored key (`ssd`, `raw@knn`, `cmg[lle]@knn`) in the order
    the keys first appear; NaN where a task has no value."""
    missing = [c for c in ("seed", "method", metric) if c not in per_task.columns]
    if missing:
        raise DataError(f"the per-task table has no column(s) {missing}; it has {list(per_task.columns)}")
    scorers = per_task["scorer"] if "scorer" in per_task.columns else ["mahalanobis"] * len(per_task)
    keys = [scored_key(m, s) if isinstance(s, str) else m for m, s in zip(per_task["method"], scorers)]
    long = pd.DataFrame({"seed": per_task["seed"].to_numpy(), "key": keys,
                         "value": pd.to_numeric(per_task[metric], errors="coerce").to_numpy()})
    twice = long[long.duplicated(["seed", "key"], keep=False)]
    if not twice.empty:
        raise DataError(f"the per-task table has more than one {metric} for (seed, method): "
                        f"{sorted(set(zip(twice.seed, twice.key)))[:5]}")
    return long.pivot(index="seed", columns="key", values="value")[list(dict.fromkeys(keys))]


def paired_comparisons(per_task: pd.DataFrame, references=REFERENCES, metric: str = "auroc") -> pd.DataFrame:
    """Every scored method of `per_task` (columns as in `task_table`) against each reference present, on the tasks
    where both have a finite value -> one row per comparison, columns `COLUMNS`: reference, method (scored keys),
    metric, n, mean_diff / ci95_low / ci95_high (method - reference, in the metric's points), wilcoxon_p,
    ttest_p, their Holm adjustments over all rows of the table with a p-value (one family per test) and note.
    A reference absent from the experiment, a method against itself and a pair already compared the other way
    round (`raw@knn` against `ssd`, then `ssd` against `raw@knn`) give no row."""
    table = task_table(per_task, metric)
    rows, seen = [], set()
    for ref in references:
        if ref not in table.columns:
            continue
        for key in table.columns:
            if key == ref or frozenset((key, ref)) in seen:
                continue
            seen.add(frozenset((key, ref)))
            pair = table[[key, ref]].to_numpy()
            pair = pair[np.isfinite(pair).all(axis=1)]
            rows.append({"reference": ref, "method": key, "metric": metric, **compare_pair(pair[:, 0], pair[:, 1])})
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    for test in ("wilcoxon_p", "ttest_p"):
        out[f"{test}_holm"] = holm_adjust(out[test].to_numpy(dtype=np.float64))
    return out


def significance_note(df: pd.DataFrame) -> str:
    """How to read the table of `paired_comparisons` (df), in words: the tests, the Holm families and the
    smallest p a two-sided exact Wilcoxon test can give over the table's numbers of tasks."""
    ns = sorted({int(n) for n in df["n"] if n >= 2})
    smallest = ", ".join(f"{2.0 / 2 ** n:.4g} for n = {n}" for n in ns)
    metric = str(df["metric"].iloc[0]).upper() if len(df) else "the metric"
    return (f"Each method against each reference over the tasks both have a value for (n): mean paired difference "
            f"method − reference in {metric} points with its 95% t-interval; two-sided Wilcoxon signed-rank p "
            "(scipy.stats.wilcoxon, exact for small n) and paired t-test p (scipy.stats.ttest_rel); Holm: Holm's "
            "step-down adjustment over all comparisons of this table, one family per test. A pair compared the "
            "other way round is listed once. The smallest two-sided p the Wilcoxon test can give over n tasks is "
            "2/2^n: with n = 5 tasks it is 0.0625, so no comparison over 5 tasks can reach p < 0.05 by Wilcoxon"
            + (f" (here: {smallest})." if smallest else "."))


def _p(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:.4g}"


def significance_markdown(df: pd.DataFrame) -> str:
    """A 'Paired comparisons' section (markdown) of the table of `paired_comparisons` (df): the note, then one
    line per comparison."""
    if df.empty:
        return ("## Paired comparisons\n\nNo paired comparisons: none of the reference methods "
                f"({', '.join(REFERENCES)}) is in this experiment, or it has no other method.")
    metric = str(df["metric"].iloc[0]).upper()
    lines = [f"| method | reference | n | Δ {metric} | 95% CI | Wilcoxon p | Holm | t-test p | Holm | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        diff = "–" if np.isnan(r.mean_diff) else f"{r.mean_diff:+.2f}"
        ci = "–" if np.isnan(r.ci95_low) else f"[{r.ci95_low:+.2f}, {r.ci95_high:+.2f}]"
        lines.append(f"| {r.method} | {r.reference} | {r.n} | {diff} | {ci} | {_p(r.wilcoxon_p)} | "
                     f"{_p(r.wilcoxon_p_holm)} | {_p(r.ttest_p)} | {_p(r.ttest_p_holm)} | {r.note} |")
    return f"## Paired comparisons ({metric})\n\n{significance_note(df)}\n\n" + "\n".join(lines)
