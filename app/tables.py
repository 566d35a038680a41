"""Tables derived from a run folder for display; all metric math comes from `cmg_core.metrics` and
`cmg_core.significance`."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cmg_core.errors import DataError
from cmg_core.significance import paired_comparisons

from .state import RunData

METRICS = ("auroc", "aupr", "fpr95")


def metrics_table(run: RunData) -> pd.DataFrame | None:
    """Method -> auroc/aupr/fpr95 (percent) from metrics.json; computed from scores.csv when it is missing."""
    from cmg_core.methods import scored_key, split_key

    data = run.metrics() if run.has("metrics") else {}
    if data:
        df = pd.DataFrame.from_dict(data, orient="index")
        keys = run.scored_methods()
        order = [m for m in keys if m in df.index] + [m for m in df.index if m not in keys]
        df = df.loc[order, [c for c in METRICS if c in df.columns] + [c for c in df.columns if c not in METRICS]]
        labels = (run.info or {}).get("method_labels") or {}  # LE methods named with their CMLE reading

        def label(key: str) -> str:  # `cmg@knn` -> `cmg[lle]@knn`
            m, scorer = split_key(key)
            return scored_key(labels.get(m, m), scorer)
        return df.rename(index=label)
    if not (run.has("scores") and run.has("images")):
        return None
    from cmg_core.metrics import detection_metrics

    y, scores = test_arrays(run)
    rows = {m: detection_metrics(y, s) for m, s in scores.items()}
    return pd.DataFrame.from_dict(rows, orient="index") if rows else None


def test_arrays(run: RunData, methods: list[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(is_anomaly of the test rows, {method: test scores})."""
    images = run.images()
    test = (images["role"] == "test").to_numpy()
    y = images["is_anomaly"].to_numpy()[test].astype(int)
    out = {}
    for m in methods or run.scored_methods():
        out[m] = run.method_scores(m)[test]
    return y, out


def roc_data(run: RunData, methods: list[str]) -> tuple[dict, dict]:
    """({method: (fpr, tpr)}, {method: AUROC %}) on the test rows."""
    from cmg_core.metrics import detection_metrics, roc_points

    y, scores = test_arrays(run, methods)
    curves, aucs = {}, {}
    for m, s in scores.items():
        if 0 < y.sum() < len(y):  # a one-class run has no ROC
            curves[m] = roc_points(y, s)
            aucs[m] = detection_metrics(y, s)["auroc"]
    return curves, aucs


def train_scores(run: RunData, method: str) -> np.ndarray:
    """Scores of the normal training images (scores.csv rows with role == train)."""
    images = run.images()
    train = (images["role"] == "train").to_numpy()
    return run.method_scores(method)[train]


# --- analysis data ------------------------------------------------------------------------------------

def _records_from(obj: Any) -> list[dict]:
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if isinstance(obj, dict):
        for key in ("tasks", "per_task", "results", "records", "runs"):
            if key in obj:
                return _records_from(obj[key])
        src = obj.get("methods", obj)
        # {method: {metric: [values per task]}}
        out = []
        for m, d in src.items():
            if isinstance(d, dict) and any(isinstance(d.get(k), list) for k in METRICS):
                n = max(len(d[k]) for k in METRICS if isinstance(d.get(k), list))
                for t in range(n):
                    rec = {"method": m, "task": t}
                    for k in METRICS:
                        if isinstance(d.get(k), list) and t < len(d[k]):
                            rec[k] = d[k][t]
                    out.append(rec)
        return out
    return []


def experiment_records(exp: Any) -> pd.DataFrame:
    """Per-task results of `cmg experiment` as a long table: method, task, auroc, aupr, fpr95.

    Accepts a list of records ({method, task, auroc, ...} or {task, metrics: {method: {...}}}), the same
    under "tasks"/"per_task"/"results", or {method: {metric: [values per task]}}."""
    rows = []
    for i, r in enumerate(_records_from(exp)):
        task = r.get("task", r.get("seed", i))
        if "method" in r:  # `cmg experiment` rows carry a scorer: the k-NN rows are named `<method>@knn`
            scorer = r.get("scorer") or "mahalanobis"
            rec = {"method": r["method"] + ("" if scorer == "mahalanobis" else f"@{scorer}"), "task": task}
            src = r.get("metrics", r)
            rec.update({k: src[k] for k in METRICS if k in src})
            rows.append(rec)
        else:
            nested = r.get("metrics", r)
            for m, d in nested.items():
                if isinstance(d, dict) and any(k in d for k in METRICS):
                    rows.append({"method": m, "task": task, **{k: d[k] for k in METRICS if k in d}})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for k in METRICS:
        if k in df.columns:
            df[k] = pd.to_numeric(df[k], errors="coerce")
            if df[k].dropna().between(0, 1).all() and df[k].dropna().max() <= 1.0:
                df[k] = df[k] * 100.0  # fractions -> percent
    return df


def ci_table(records: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean ± t-interval half-width (cmg_core.metrics.mean_ci) per method and metric, with n tasks."""
    from cmg_core.metrics import mean_ci

    out = {}
    for m, g in records.groupby("method", sort=False):
        row = {"tasks": int(len(g))}
        for k in METRICS:
            if k in g.columns and g[k].notna().any():
                mean, half = mean_ci(g[k].dropna().to_numpy(), confidence)
                row[k], row[f"{k}_ci"] = mean, half
        out[m] = row
    return pd.DataFrame.from_dict(out, orient="index")


def paired_table(exp: Any) -> pd.DataFrame:
    """`cmg_core.significance.paired_comparisons` (columns as in significance.csv) of the per-task records of
    analysis/experiment.json (`exp`: its per_task rows carry seed, method, scorer, auroc); empty when they are not
    there."""
    per_task = pd.DataFrame(_records_from(exp))
    if per_task.empty or not {"seed", "method", "auroc"} <= set(per_task.columns):
        return pd.DataFrame()
    return paired_comparisons(per_task)


def fig9_data(run: RunData) -> pd.DataFrame | None:
    """analysis/fig9.json as a table (None when absent).

    `cmg experiment` writes one record per task and mask type: {seed, mask, auroc (CMG), rid_val_acc}.
    A generic {"groups": {name: [values]}} is accepted too (columns group/value)."""
    data = run.analysis("fig9")
    if not data:
        return None
    if isinstance(data, dict):
        groups = data.get("groups") or data.get("values")
        if isinstance(groups, dict):
            return pd.DataFrame([{"group": g, "value": v} for g, vs in groups.items() for v in vs])
        data = data.get("records", [])
    df = pd.DataFrame([r for r in data if isinstance(r, dict)])
    if df.empty:
        raise DataError(f"analysis/fig9.json of run {run.name!r} has no records to plot")
    return df


def per_task_box(run: RunData) -> pd.DataFrame | None:
    """Per-task AUROC by method (group/value) from analysis/experiment.json, or None."""
    exp = run.analysis("experiment")
    if not exp:
        return None
    rec = experiment_records(exp)
    if rec.empty or "auroc" not in rec.columns:
        return None
    return rec.rename(columns={"method": "group", "auroc": "value"})[["group", "value"]]
