"""The fitted anomaly scorers: sklearn/PyOD shape, reusable on new images.

Two scorers of a method's features (config `detector.scorers`):

* `MahalanobisDetector(n_clusters, covariance)` (paper Eq.14, SSD) stores the normalisation statistics, the
  k-means clusters and one Gaussian per cluster; its score is the min over clusters of the squared Mahalanobis
  distance. `ssd_scores` in tests/reference.py is the one-shot form of the same computation; a test checks they
  agree. Features are z-scored with the divisors of `scoring.standardization_scale`, so a (near-)constant
  training feature such as a dead ReLU channel cannot dominate the score.
* `KNNDetector(k)`: the mean distance to the k nearest L2-normalised normal training features.

Both: `score(feats)` (= `decision_function`, higher = more anomalous); `predict(feats)` flags a score above
`threshold_`, set by cross-fitting at the false-positive rate `fpr` (their base class
`calibration.CalibratedDetector` explains how; the methods' own scorers `bliss.BLISSDetector` and
`she.SHEDetector` share it). `detector_from_state` loads a saved detector of any of them.
"""
from __future__ import annotations

import warnings

import numpy as np

from .bliss import BLISSDetector
from .calibration import CalibratedDetector
from .errors import ConfigError, DataError
from .scoring import (factored_mahalanobis_sq, fit_gaussian, l2_normalize, mahalanobis_sq, precision_factor,
                      standardization_scale)
from .she import SHEDetector


def resolve_covariance(covariance: str, n: int, d: int) -> str:
    """`auto`: Ledoit-Wolf shrinkage when n <= 2 d, else the pseudo-inverse (SSD).

    With n <= d the pinv estimate puts every training point at the same distance (n - 1), so the training
    scores carry no information and test scores ignore every direction outside the training span.
    """
    if covariance != "auto":
        return covariance
    return "shrinkage" if n <= 2 * d else "pinv"


class MahalanobisDetector(CalibratedDetector):
    """Parameters: n_clusters (k-means clusters, default 1), covariance (auto | pinv | shrinkage | empirical),
    seed, fpr (share of normal images the threshold is meant to flag, default 0.05), calibration_folds (K of the
    cross-fitting that sets the threshold, default 10; 0 = threshold on the training scores, uncalibrated).

    Fitted attributes: mean_, std_ (mean and std of the L2-normalised train features), scale_ (D,) (the
    z-score divisors `scoring.standardization_scale(std_)`: std_, except the typical std for (near-)constant
    features; derived from std_, not saved), means_ (K, D), the clusters' precisions: precisions_ (K, D, D), or
    when every cluster has fewer members than D the factors of `scoring.precision_factor` (alphas_ (K,), signs_
    (K,), factors_ (K, R, D), zero-padded; no (D, D) matrix is formed or stored), train_scores_ (N,) scores
    of the training features themselves, calibration_scores_ (N,) their out-of-fold scores (the reference for
    `percentile`), threshold_ (the (1 - fpr) quantile of calibration_scores_), calibrated_ (False when the
    threshold comes from the training scores: calibration_folds=0, too few training points, or a detector
    saved before calibration existed).
    """

    scorer = "mahalanobis"

    def __init__(self, n_clusters: int = 1, covariance: str = "auto", seed: int = 0, fpr: float = 0.05,
                 calibration_folds: int = 10):
        self.n_clusters = n_clusters
        self.covariance = covariance
        self.seed = seed
        self.fpr = fpr
        self.calibration_folds = calibration_folds

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        """(x / ||x|| - mean_) / scale_, the rule of `standardize` in tests/reference.py."""
        return (l2_normalize(x) - self.mean_) / self.scale_

    def _check_size(self, n: int) -> None:
        if not 1 <= self.n_clusters <= n:
            raise ConfigError(f"detector.n_clusters={self.n_clusters} must lie in 1..{n} (training features)")

    def _min_fit_rows(self) -> int:
        return max(2 * self.n_clusters, 4)  # >= 2 points per cluster

    def _clone_uncalibrated(self) -> "MahalanobisDetector":
        return MahalanobisDetector(self.n_clusters, self.covariance, self.seed, self.fpr, 0)

    def _fit_model(self, x: np.ndarray, labels: np.ndarray | None) -> None:
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
        groups = [z[labels == c] for c in kept]
        factors = [precision_factor(g, resolve_covariance(self.covariance, *g.shape)) for g in groups]
        for k in ("precisions_", "alphas_", "signs_", "factors_"):  # a refit replaces the other form too
            self.__dict__.pop(k, None)
        if all(f is not None for f in factors):  # every cluster has fewer members than dimensions: no (D, D)
            self.means_ = np.stack([f[0] for f in factors])
            self.alphas_ = np.array([f[1] for f in factors])
            self.signs_ = np.array([f[2] for f in factors])
            rank = max(len(f[3]) for f in factors)
            self.factors_ = np.stack([np.pad(f[3], ((0, rank - len(f[3])), (0, 0))) for f in factors])  # zero rows
        else:
            gaussians = [fit_gaussian(g, resolve_covariance(self.covariance, *g.shape)) for g in groups]
            self.means_ = np.stack([g[0] for g in gaussians])
            self.precisions_ = np.stack([g[1] for g in gaussians])

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(M, D) features -> (M,) anomaly scores, always finite."""
        if not hasattr(self, "means_"):
            raise ConfigError("MahalanobisDetector.score called before fit")
        z = self._standardize(self._checked(feats, self.means_.shape[1]))
        if hasattr(self, "factors_"):
            per = [factored_mahalanobis_sq(z, m, a, s, w)
                   for m, a, s, w in zip(self.means_, self.alphas_, self.signs_, self.factors_)]
        else:
            per = [mahalanobis_sq(z, m, p) for m, p in zip(self.means_, self.precisions_)]
        return np.min(np.stack(per), axis=0)

    @property
    def _STATE(self) -> tuple:
        precision = ("alphas_", "signs_", "factors_") if hasattr(self, "factors_") else ("precisions_",)
        return ("n_clusters", "covariance", "seed", "fpr", "calibration_folds", "mean_", "std_", "means_",
                *precision, "train_scores_", "calibration_scores_", "threshold_", "calibrated_")

    @classmethod
    def from_state_dict(cls, state: dict) -> "MahalanobisDetector":
        det = cls(state["n_clusters"], state["covariance"], state["seed"], float(state.get("fpr", 0.05)),
                  int(state.get("calibration_folds", 0)))
        precision = ("alphas_", "signs_", "factors_") if "factors_" in state else ("precisions_",)
        for k in ("mean_", "std_", "means_", *precision, "train_scores_"):
            setattr(det, k, np.asarray(state[k]))
        det.scale_ = standardization_scale(det.std_)
        det._restore_threshold(state)
        return det


class KNNDetector(CalibratedDetector):
    """k-NN distance score: the mean Euclidean distance of an L2-normalised feature to its k nearest
    L2-normalised normal training features (a monotone function of cosine distance; higher = more anomalous).
    No distribution is fitted, so it needs no covariance estimate and does well where normal data form several
    tight groups (e.g. frozen ImageNet features of scene classes).

    Parameters: k (neighbours, default 5), seed (folds of the cross-fitting), fpr, calibration_folds (as for
    MahalanobisDetector). Fitted attributes: train_ (N, D) the L2-normalised training features, train_scores_
    (N,) (each point counts itself among its neighbours: optimistic), calibration_scores_, threshold_, calibrated_.
    """

    scorer = "knn"

    def __init__(self, k: int = 5, seed: int = 0, fpr: float = 0.05, calibration_folds: int = 10):
        self.k = k
        self.seed = seed
        self.fpr = fpr
        self.calibration_folds = calibration_folds

    def _check_size(self, n: int) -> None:
        if not 1 <= self.k < n:
            raise ConfigError(f"detector.knn_k={self.k} must lie in 1..{n - 1} (the training features less one)")

    def _min_fit_rows(self) -> int:
        return self.k

    def _clone_uncalibrated(self) -> "KNNDetector":
        return KNNDetector(self.k, self.seed, self.fpr, 0)

    def _fit_model(self, x: np.ndarray, labels: np.ndarray | None = None) -> None:
        self._index(l2_normalize(x))

    def _index(self, normalized: np.ndarray) -> None:
        from sklearn.neighbors import NearestNeighbors

        self.train_ = normalized
        self.index_ = NearestNeighbors(n_neighbors=self.k).fit(normalized)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(M, D) features -> (M,) mean distance to the k nearest training features."""
        if not hasattr(self, "train_"):
            raise ConfigError("KNNDetector.score called before fit")
        x = self._checked(feats, self.train_.shape[1])
        if not len(x):
            return np.zeros(0)
        dist, _ = self.index_.kneighbors(l2_normalize(x))
        return dist.mean(axis=1)

    _STATE = ("k", "seed", "fpr", "calibration_folds", "train_", "train_scores_", "calibration_scores_",
              "threshold_", "calibrated_")

    def state_dict(self) -> dict:
        """As stored in a run folder: the (N, D) training features in float32 (half the size; a loaded detector's
        distances differ from the fitted one's by float32 rounding, ~1e-7 relative)."""
        return {**super().state_dict(), "train_": self.train_.astype(np.float32)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "KNNDetector":
        det = cls(int(state["k"]), int(state["seed"]), float(state["fpr"]), int(state["calibration_folds"]))
        det._index(np.asarray(state["train_"], dtype=np.float64))
        det.train_scores_ = np.asarray(state["train_scores_"])
        det._restore_threshold(state)
        return det


DETECTORS = {"mahalanobis": MahalanobisDetector, "knn": KNNDetector}  # the classes of methods.SCORERS


def make_detector(scorer: str, cfg, seed: int = 0) -> CalibratedDetector:
    """The detector of `scorer` with the settings of a `detector` config section (cmg_core.config)."""
    if scorer == "mahalanobis":
        return MahalanobisDetector(cfg.n_clusters, cfg.covariance, seed=seed, fpr=cfg.fpr,
                                   calibration_folds=cfg.calibration_folds)
    if scorer == "knn":
        return KNNDetector(cfg.knn_k, seed=seed, fpr=cfg.fpr, calibration_folds=cfg.calibration_folds)
    raise ConfigError(f"detector.scorers: unknown scorer {scorer!r}; expected one of {list(DETECTORS)}")


def detector_from_state(scorer: str, state: dict) -> CalibratedDetector:
    """A saved detector of any scorer: mahalanobis, knn, or a method's own (bliss, she)."""
    known = {**DETECTORS, "bliss": BLISSDetector, "she": SHEDetector}
    if scorer not in known:
        raise DataError(f"unknown scorer {scorer!r} in a saved model; this version knows {list(known)}")
    return known[scorer].from_state_dict(state)
