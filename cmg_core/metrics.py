"""Detection metrics (anomaly = positive class) and confidence intervals over seeds.  numpy in/out."""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from .errors import ConfigError, DataError

__all__ = ["auroc", "aupr", "fpr_at_95_tpr", "roc_points", "detection_metrics", "mean_ci"]


def _check(is_anomaly: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(is_anomaly).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise DataError(f"is_anomaly has {y.size} entries but scores has {s.size}")
    if not np.all(np.isin(y, (0, 1))):
        raise DataError(f"is_anomaly must contain only 0 (normal) and 1 (anomaly), got values {np.unique(y)[:10].tolist()}")
    if not np.all(np.isfinite(s)):
        raise DataError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf values")
    n_anom = int(y.sum())
    if n_anom == 0 or n_anom == y.size:
        raise DataError(
            f"metrics need both classes: got {y.size - n_anom} normal and {n_anom} anomalous samples"
        )
    return y.astype(np.int64), s


def auroc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve in [0, 1] (sklearn ``roc_auc_score``); higher score = more anomalous."""
    y, s = _check(is_anomaly, scores)
    return float(roc_auc_score(y, s))


def aupr(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve with anomalies as positives (``average_precision_score``)."""
    y, s = _check(is_anomaly, scores)
    return float(average_precision_score(y, s))


def fpr_at_95_tpr(is_anomaly: np.ndarray, scores: np.ndarray, tpr_level: float = 0.95) -> float:
    """FPR on normals at the first ROC threshold (from the strictest) that detects at least
    ``tpr_level`` of the anomalies, in [0, 1].

    No interpolation: ``roc_curve(drop_intermediate=False)`` and the first point with
    ``tpr >= tpr_level``, i.e. the threshold is the score of the anomaly that brings the detection rate
    to 95%; ties between normal and anomalous scores count the normals as false positives.
    """
    if not 0.0 < tpr_level <= 1.0:
        raise ConfigError(f"tpr_level={tpr_level} must lie in (0, 1]")
    y, s = _check(is_anomaly, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmax(tpr >= tpr_level - 1e-12))
    return float(fpr[i])


def roc_points(is_anomaly: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve (sklearn ``roc_curve``), for plotting."""
    y, s = _check(is_anomaly, scores)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def detection_metrics(is_anomaly: np.ndarray, scores: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """``{"auroc", "aupr", "fpr95"}`` in percent (0-100); with the detector's `threshold` also
    ``threshold`` and ``flagged_normal`` / ``flagged_anomaly``: the share (percent) of the normal / anomalous
    images whose score is above it (the verdict's realised false-positive rate and detection rate).
    Without anomalies (or without normals) among the images - a one-class run - the ranking metrics are left
    out and only the threshold's are given (with a threshold; else an error)."""
    y = np.asarray(is_anomaly).reshape(-1)
    both = bool(y.size) and 0 < int(np.sum(y == 1)) < y.size
    out = {}
    if both or threshold is None:
        out = {
            "auroc": 100.0 * auroc(is_anomaly, scores),
            "aupr": 100.0 * aupr(is_anomaly, scores),
            "fpr95": 100.0 * fpr_at_95_tpr(is_anomaly, scores),
        }
    if threshold is not None:
        y, flagged = np.asarray(is_anomaly).astype(bool), np.asarray(scores) > threshold
        out["threshold"] = float(threshold)
        out["flagged_normal"] = 100.0 * float(flagged[~y].mean()) if (~y).any() else None  # None: no such images
        out["flagged_anomaly"] = 100.0 * float(flagged[y].mean()) if y.any() else None
    return out


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean:
    ``t.ppf((1 + confidence) / 2, n - 1) * std(ddof=1) / sqrt(n)``; half-width 0 for a single value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise DataError("mean_ci needs at least one value, got none")
    if not np.all(np.isfinite(v)):
        raise DataError(f"mean_ci got non-finite values: {v.tolist()}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence={confidence} must lie in (0, 1)")
    mean = float(v.mean())
    if v.size == 1:
        return mean, 0.0
    half = stats.t.ppf((1.0 + confidence) / 2.0, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return mean, float(half)
