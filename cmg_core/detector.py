"""The fitted anomaly scorers: sklearn/PyOD shape, reusable on new images.

Two scorers of a method's features (config `detector.scorers`):

* `MahalanobisDetector(n_clusters, covariance)` (paper Eq.14, SSD) stores the normalisation statistics, the
  k-means clusters and one Gaussian per cluster; its score is the min over clusters of the squared Mahalanobis
  distance. `cluster_min_mahalanobis` in scoring.py is the one-shot form of the same computation; a test checks
  they agree. Features are z-scored with the divisors of `scoring.standardization_scale` (the rule
  `scoring.standardize` uses too), so a (near-)constant training feature such as a dead ReLU channel cannot
  dominate the score.
* `KNNDetector(k)`: the mean distance to the k nearest L2-normalised normal training features.

Both: `score(feats)` (= `decision_function`, higher = more anomalous); `predict(feats)` flags a score above
`threshold_`, set by cross-fitting at the false-positive rate `fpr`: each of `calibration_folds` folds of the
normal training features is scored by a detector fitted on the other folds, and the threshold is the (1 - fpr)
quantile of these out-of-fold scores. (A detector scores its own training points low - with N close to D
Mahalanobis distances of fitted points shrink, and a point is its own nearest neighbour - so a threshold on them
flags far more than fpr of new normal images.)
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import ConfigError, DataError
from .scoring import (factored_mahalanobis_sq, fit_gaussian, l2_normalize, mahalanobis_sq, precision_factor,
                      standardization_scale)


def resolve_covariance(covariance: str, n: int, d: int) -> str:
    """`auto`: Ledoit-Wolf shrinkage when n <= 2 d, else the pseudo-inverse (SSD).

    With n <= d the pinv estimate puts every training point at the same distance (n - 1), so the training
    scores carry no information and test scores ignore every direction outside the training span.
    """
    if covariance != "auto":
        return covariance
    return "shrinkage" if n <= 2 * d else "pinv"


class CalibratedDetector:
    """What every scorer shares: `fit` checks the features, fits the scorer (`_fit_model`), and sets `threshold_`
    by K-fold cross-fitting at the false-positive rate `fpr`; `predict`, `percentile`, `describe_threshold`.
    Subclasses implement `_fit_model(x, labels)`, `score(feats)`, `_clone_uncalibrated()` and list their fitted
    state in `_STATE`."""

    scorer = ""
    _STATE: tuple = ()

    def fit(self, train: np.ndarray, labels: np.ndarray | None = None):
        """train (N, D); labels (N,) optional partition (used by the Mahalanobis scorer, e.g. caption clusters)."""
        x = np.asarray(train, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise DataError(f"detector.fit expects (N, D) features with N >= 2, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("detector.fit: training features contain NaN or inf")
        if not 0 < self.fpr < 1:
            raise ConfigError(f"detector.fpr={self.fpr}; expected a share of normal images in (0, 1), e.g. 0.05")
        self._check_size(len(x))
        self._fit_model(x, labels)
        self.train_scores_ = self.score(x)
        self.calibration_scores_, self.calibrated_ = self._cross_fit_scores(x, labels)
        self.threshold_ = float(np.quantile(self.calibration_scores_, 1 - self.fpr, method="higher"))
        return self

    def _check_size(self, n: int) -> None:
        """ConfigError when n training features are too few for this scorer's settings."""

    def _min_fit_rows(self) -> int:
        """The fewest rows a fold may be fitted on."""
        return 4

    def _cross_fit_scores(self, x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """(N,) out-of-fold scores of the training features and whether they are out of fold (needs at least
        2 folds, each leaving enough rows to fit on); else the in-sample training scores."""
        k = min(int(self.calibration_folds), len(x) // 2)
        if k < 2 or len(x) - len(x) // k < self._min_fit_rows():
            return self.train_scores_.copy(), False
        from sklearn.model_selection import KFold

        out = np.empty(len(x))
        for fit_rows, held in KFold(k, shuffle=True, random_state=self.seed).split(x):
            part = self._clone_uncalibrated()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small clusters inside a fold are dropped quietly
                part._fit_model(x[fit_rows], None if labels is None else np.asarray(labels)[fit_rows])
            out[held] = part.score(x[held])
        return out, True

    def _checked(self, feats: np.ndarray, dim: int) -> np.ndarray:
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != dim:
            raise DataError(f"detector.score expects (M, {dim}) features, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("detector.score: features contain NaN or inf")
        return x

    def decision_function(self, feats: np.ndarray) -> np.ndarray:
        """The scikit-learn / PyOD name of `score`."""
        return self.score(feats)

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """(M, D) features -> (M,) 1 = anomalous (score above `threshold_`), 0 = normal."""
        return (self.score(feats) > self.threshold_).astype(np.int64)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percentile (0-100) of each score among the normal training images' out-of-fold scores (their
        training scores when uncalibrated)."""
        ref = np.sort(self.calibration_scores_)
        return 100.0 * np.searchsorted(ref, np.asarray(scores), side="right") / len(ref)

    def describe_threshold(self) -> str:
        """What `threshold_` means, in words, for the CLI and the app."""
        if self.calibrated_:
            return (f"calibrated: expected {100 * self.fpr:.0f} % of normal images flagged "
                    f"({self.calibration_folds}-fold cross-fitting on the normal training images)")
        return (f"uncalibrated: the {100 * (1 - self.fpr):.0f}th percentile of the training scores, which flags "
                "far more than that share of new normal images; retrain to calibrate")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def _restore_threshold(self, state: dict) -> None:
        if "threshold_" in state:
            self.calibration_scores_ = np.asarray(state["calibration_scores_"])
            self.threshold_, self.calibrated_ = float(state["threshold_"]), bool(state["calibrated_"])
        else:  # saved before calibration existed
            self.calibration_scores_, self.calibrated_ = self.train_scores_, False
            self.threshold_ = float(np.quantile(self.train_scores_, 1 - self.fpr, method="higher"))


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
        """(x / ||x|| - mean_) / scale_, the same rule as `scoring.standardize`."""
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


SCORERS = {"mahalanobis": MahalanobisDetector, "knn": KNNDetector}


def make_detector(scorer: str, cfg, seed: int = 0) -> CalibratedDetector:
    """The detector of `scorer` with the settings of a `detector` config section (cmg_core.config)."""
    if scorer == "mahalanobis":
        return MahalanobisDetector(cfg.n_clusters, cfg.covariance, seed=seed, fpr=cfg.fpr,
                                   calibration_folds=cfg.calibration_folds)
    if scorer == "knn":
        return KNNDetector(cfg.knn_k, seed=seed, fpr=cfg.fpr, calibration_folds=cfg.calibration_folds)
    raise ConfigError(f"detector.scorers: unknown scorer {scorer!r}; expected one of {list(SCORERS)}")


def detector_from_state(scorer: str, state: dict) -> CalibratedDetector:
    """A saved detector of any scorer: mahalanobis, knn, or a method's own (bliss, she)."""
    from .bliss import BLISSDetector
    from .she import SHEDetector

    known = {**SCORERS, "bliss": BLISSDetector, "she": SHEDetector}
    if scorer not in known:
        raise DataError(f"unknown scorer {scorer!r} in a saved model; this version knows {list(known)}")
    return known[scorer].from_state_dict(state)
