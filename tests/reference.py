"""Reference implementations the tests check cmg_core against (not part of the package: nothing else calls them).

`ssd_scores` is SSD's one-shot computation (Sehwag et al., 2021; paper Eq.14) - `standardize`, then
`cluster_min_mahalanobis` - which `cmg_core.detector.MahalanobisDetector` splits into fit and score.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans

from cmg_core.errors import ConfigError, DataError
from cmg_core.scoring import _as_2d, fit_gaussian, l2_normalize, mahalanobis_sq, standardization_scale


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """L2-normalise ``train (N, D)`` and every array in ``others (M_i, D)``, then z-score all of them
    with the mean/std of the normalised TRAIN set: ``(x - mean) / scale`` with
    ``scale = standardization_scale(std)``, i.e. SSD's ``(x - mean) / std`` except that (near-)constant
    features are divided by the features' typical std instead of ~0.  Returns a tuple ``(train, *others)``."""
    tr = l2_normalize(train)
    mean = tr.mean(axis=0, keepdims=True)
    scale = standardization_scale(tr.std(axis=0, keepdims=True))
    return tuple((a - mean) / scale for a in (tr, *(l2_normalize(o) for o in others)))


def cluster_min_mahalanobis(
    train: np.ndarray,
    test: np.ndarray,
    n_clusters: int = 1,
    covariance: str = "pinv",
    seed: int = 0,
) -> np.ndarray:
    """Eq. 14 / SSD: k-means (sklearn ``KMeans``, ``n_init=10``) on ``train (N, D)``, one Gaussian per
    cluster, score of ``test (M, D)`` = min over clusters of the squared Mahalanobis distance -> ``(M,)``.

    ``n_clusters=1`` fits a single Gaussian without k-means.  Clusters with fewer than 2 members are
    dropped with a warning (a Gaussian needs 2 points).
    """
    tr = _as_2d(train, "train")
    te = _as_2d(test, "test")
    if tr.shape[1] != te.shape[1]:
        raise DataError(f"train has D={tr.shape[1]} features but test has D={te.shape[1]}")
    k = int(n_clusters)
    if k < 1 or k > tr.shape[0]:
        raise ConfigError(f"n_clusters={n_clusters} must lie in 1..N, with N={tr.shape[0]} training features")
    if k == 1:
        labels = np.zeros(tr.shape[0], dtype=np.int64)
    else:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(tr)
    ids, counts = np.unique(labels, return_counts=True)
    small = ids[counts < 2]
    if small.size:
        warnings.warn(
            f"SSD: dropping {small.size} of {ids.size} k-means clusters with fewer than 2 members "
            f"(clusters {small.tolist()})",
            stacklevel=2,
        )
    kept = ids[counts >= 2]
    if kept.size == 0:
        raise ConfigError(f"every one of the {ids.size} clusters has fewer than 2 members; lower n_clusters={n_clusters}")
    dists = [mahalanobis_sq(te, *fit_gaussian(tr[labels == c], covariance)) for c in kept]
    return np.min(np.stack(dists, axis=0), axis=0)


def ssd_scores(
    train_feats: np.ndarray,
    test_feats: np.ndarray,
    n_clusters: int = 1,
    covariance: str = "pinv",
    seed: int = 0,
) -> np.ndarray:
    """Anomaly scores ``(M,)`` of ``test_feats (M, D)`` given the normal ``train_feats (N, D)``:
    :func:`standardize`, then :func:`cluster_min_mahalanobis`.  Higher = more anomalous; always finite
    (inputs with NaN/inf raise a DataError naming the array)."""
    tr = _as_2d(train_feats, "train_feats")
    te = _as_2d(test_feats, "test_feats")
    if tr.shape[1] != te.shape[1]:
        raise DataError(f"train_feats has D={tr.shape[1]} features but test_feats has D={te.shape[1]}")
    tr, te = standardize(tr, te)
    scores = cluster_min_mahalanobis(tr, te, n_clusters=n_clusters, covariance=covariance, seed=seed)
    if not np.all(np.isfinite(scores)):
        raise DataError(f"SSD produced {int((~np.isfinite(scores)).sum())} non-finite scores; check the features")
    return scores


def distance_correlation(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """Distance correlation of ``x (N, P)`` and ``y (N, Q)`` written out from its definitions, pair by pair:
    biased dCor (Szekely, Rizzo & Bakirov 2007, double-centred distances, the square root of the ratio), or with
    ``unbiased`` the bias-corrected squared dCor (Szekely & Rizzo 2014, U-centred distances, not square-rooted)."""
    n = len(x)

    def dist(z):
        return [[float(np.linalg.norm(np.asarray(z[i], float) - np.asarray(z[j], float))) for j in range(n)]
                for i in range(n)]

    def centred(d):
        row = [sum(d[i]) for i in range(n)]
        col = [sum(d[i][j] for i in range(n)) for j in range(n)]
        tot = sum(row)
        if not unbiased:
            return [[d[i][j] - row[i] / n - col[j] / n + tot / n ** 2 for j in range(n)] for i in range(n)]
        return [[0.0 if i == j else d[i][j] - row[i] / (n - 2) - col[j] / (n - 2) + tot / ((n - 1) * (n - 2))
                 for j in range(n)] for i in range(n)]

    def dcov(a, b):
        s = sum(a[i][j] * b[i][j] for i in range(n) for j in range(n))
        return s / (n * (n - 3)) if unbiased else s / n ** 2

    a, b = centred(dist(x)), centred(dist(y))
    r = dcov(a, b) / np.sqrt(dcov(a, a) * dcov(b, b))
    return float(r if unbiased else np.sqrt(r))
