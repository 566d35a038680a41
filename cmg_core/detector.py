"""The fitted anomaly scorer (paper Eq.14, SSD): sklearn/PyOD shape, reusable on new images.

`MahalanobisDetector(n_clusters, covariance).fit(train_feats)` stores the normalisation statistics, the
k-means clusters and one Gaussian per cluster; `score(feats)` is the min over clusters of the squared
Mahalanobis distance (higher = more anomalous). `cluster_min_mahalanobis` in scoring.py is the one-shot form
of the same computation; a test checks they agree.  Features are z-scored with the divisors of
`scoring.standardization_scale` (the rule `scoring.standardize` uses too), so a (near-)constant training
feature such as a dead ReLU channel cannot dominate the score.
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import ConfigError, DataError
from .scoring import fit_gaussian, l2_normalize, mahalanobis_sq, standardization_scale


def resolve_covariance(covariance: str, n: int, d: int) -> str:
    """`auto`: Ledoit-Wolf shrinkage when n <= 2 d, else the pseudo-inverse (SSD).

    With n <= d the pinv estimate puts every training point at the same distance (n - 1), so the training
    scores carry no information and test scores ignore every direction outside the training span.
    """
    if covariance != "auto":
        return covariance
    return "shrinkage" if n <= 2 * d else "pinv"


class MahalanobisDetector:
    """Parameters: n_clusters (k-means clusters, default 1), covariance (auto | pinv | shrinkage | empirical), seed.

    Fitted attributes: mean_, std_ (mean and std of the L2-normalised train features), scale_ (D,) (the
    z-score divisors `scoring.standardization_scale(std_)`: std_, except the typical std for (near-)constant
    features; derived from std_, not saved), means_ (K, D), precisions_ (K, D, D), train_scores_ (N,) scores
    of the training features themselves.
    """

    def __init__(self, n_clusters: int = 1, covariance: str = "auto", seed: int = 0):
        self.n_clusters = n_clusters
        self.covariance = covariance
        self.seed = seed

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        """(x / ||x|| - mean_) / scale_, the same rule as `scoring.standardize`."""
        return (l2_normalize(x) - self.mean_) / self.scale_

    def fit(self, train: np.ndarray, labels: np.ndarray | None = None) -> "MahalanobisDetector":
        """train (N, D); labels (N,) optional partition used instead of k-means (e.g. caption clusters)."""
        x = np.asarray(train, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise DataError(f"detector.fit expects (N, D) features with N >= 2, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("detector.fit: training features contain NaN or inf")
        if not 1 <= self.n_clusters <= len(x):
            raise ConfigError(f"detector.n_clusters={self.n_clusters} must lie in 1..{len(x)} (training features)")
        xn = l2_normalize(x)
        self.mean_ = xn.mean(axis=0)
        self.std_ = xn.std(axis=0)
        self.scale_ = standardization_scale(self.std_)
        z = self._standardize(x)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(z),):
                raise DataError(f"detector.fit: labels must have shape ({len(z)},), got {labels.shape}")
        elif self.n_clusters == 1:
            labels = np.zeros(len(z), dtype=np.int64)
        else:
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=self.n_clusters, n_init=10, random_state=self.seed).fit_predict(z)
        ids, counts = np.unique(labels, return_counts=True)
        if (counts < 2).any():
            warnings.warn(f"detector: dropping {(counts < 2).sum()} k-means cluster(s) with < 2 members", stacklevel=2)
        kept = ids[counts >= 2]
        if not len(kept):
            raise ConfigError(f"every k-means cluster has < 2 members; lower detector.n_clusters={self.n_clusters}")
        gaussians = [fit_gaussian(z[labels == c], resolve_covariance(self.covariance, *z[labels == c].shape))
                     for c in kept]
        self.means_ = np.stack([g[0] for g in gaussians])
        self.precisions_ = np.stack([g[1] for g in gaussians])
        self.train_scores_ = self.score(x)
        return self

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(M, D) features -> (M,) anomaly scores, always finite."""
        if not hasattr(self, "means_"):
            raise ConfigError("MahalanobisDetector.score called before fit")
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.means_.shape[1]:
            raise DataError(f"detector.score expects (M, {self.means_.shape[1]}) features, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("detector.score: features contain NaN or inf")
        z = self._standardize(x)
        d = np.min(np.stack([mahalanobis_sq(z, m, p) for m, p in zip(self.means_, self.precisions_)]), axis=0)
        return d

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percentile (0-100) of each score among the normal training scores."""
        ref = np.sort(self.train_scores_)
        return 100.0 * np.searchsorted(ref, np.asarray(scores), side="right") / len(ref)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n_clusters", "covariance", "seed", "mean_", "std_", "means_",
                                               "precisions_", "train_scores_")}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MahalanobisDetector":
        det = cls(state["n_clusters"], state["covariance"], state["seed"])
        for k in ("mean_", "std_", "means_", "precisions_", "train_scores_"):
            setattr(det, k, np.asarray(state[k]))
        det.scale_ = standardization_scale(det.std_)
        return det
