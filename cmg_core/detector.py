"""The fitted anomaly scorer (paper Eq.14, SSD): sklearn/PyOD shape, reusable on new images.

`MahalanobisDetector(n_clusters, covariance).fit(train_feats)` stores the normalisation statistics, the
k-means clusters and one Gaussian per cluster; `score(feats)` (= `decision_function`) is the min over clusters
of the squared Mahalanobis distance (higher = more anomalous); `predict(feats)` flags a score above
`threshold_`, set by cross-fitting at the false-positive rate `fpr`: each of `calibration_folds` folds of the
normal training features is scored by a detector fitted on the other folds, and the threshold is the (1 - fpr)
quantile of these out-of-fold scores. (A detector scores its own training points low - with N close to D
Mahalanobis distances of fitted points shrink - so a threshold on them flags far more than fpr of new normal
images.) `cluster_min_mahalanobis` in scoring.py is the one-shot form
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
    """Parameters: n_clusters (k-means clusters, default 1), covariance (auto | pinv | shrinkage | empirical),
    seed, fpr (share of normal images the threshold is meant to flag, default 0.05), calibration_folds (K of the
    cross-fitting that sets the threshold, default 10; 0 = threshold on the training scores, uncalibrated).

    Fitted attributes: mean_, std_ (mean and std of the L2-normalised train features), scale_ (D,) (the
    z-score divisors `scoring.standardization_scale(std_)`: std_, except the typical std for (near-)constant
    features; derived from std_, not saved), means_ (K, D), precisions_ (K, D, D), train_scores_ (N,) scores
    of the training features themselves, calibration_scores_ (N,) their out-of-fold scores (the reference for
    `percentile`), threshold_ (the (1 - fpr) quantile of calibration_scores_), calibrated_ (False when the
    threshold comes from the training scores: calibration_folds=0, too few training points, or a detector
    saved before calibration existed).
    """

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

    def fit(self, train: np.ndarray, labels: np.ndarray | None = None) -> "MahalanobisDetector":
        """train (N, D); labels (N,) optional partition used instead of k-means (e.g. caption clusters)."""
        x = np.asarray(train, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise DataError(f"detector.fit expects (N, D) features with N >= 2, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError("detector.fit: training features contain NaN or inf")
        if not 1 <= self.n_clusters <= len(x):
            raise ConfigError(f"detector.n_clusters={self.n_clusters} must lie in 1..{len(x)} (training features)")
        if not 0 < self.fpr < 1:
            raise ConfigError(f"detector.fpr={self.fpr}; expected a share of normal images in (0, 1), e.g. 0.05")
        self._fit_model(x, labels)
        self.train_scores_ = self.score(x)
        self.calibration_scores_, self.calibrated_ = self._cross_fit_scores(x, labels)
        self.threshold_ = float(np.quantile(self.calibration_scores_, 1 - self.fpr, method="higher"))
        return self

    def _cross_fit_scores(self, x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """(N,) out-of-fold scores of the training features and whether they are out of fold (needs at least
        2 folds, each leaving >= 2 points per cluster to fit on); else the in-sample training scores."""
        k = min(int(self.calibration_folds), len(x) // 2)
        if k < 2 or len(x) - len(x) // k < max(2 * self.n_clusters, 4):
            return self.train_scores_.copy(), False
        from sklearn.model_selection import KFold

        out = np.empty(len(x))
        for fit_rows, held in KFold(k, shuffle=True, random_state=self.seed).split(x):
            part = MahalanobisDetector(self.n_clusters, self.covariance, self.seed, self.fpr, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small clusters inside a fold are dropped quietly
                part._fit_model(x[fit_rows], None if labels is None else np.asarray(labels)[fit_rows])
            out[held] = part.score(x[held])
        return out, True

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
        gaussians = [fit_gaussian(z[labels == c], resolve_covariance(self.covariance, *z[labels == c].shape))
                     for c in kept]
        self.means_ = np.stack([g[0] for g in gaussians])
        self.precisions_ = np.stack([g[1] for g in gaussians])

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

    decision_function = score  # the scikit-learn / PyOD name

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

    _STATE = ("n_clusters", "covariance", "seed", "fpr", "calibration_folds", "mean_", "std_", "means_",
              "precisions_", "train_scores_", "calibration_scores_", "threshold_", "calibrated_")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MahalanobisDetector":
        det = cls(state["n_clusters"], state["covariance"], state["seed"], float(state.get("fpr", 0.05)),
                  int(state.get("calibration_folds", 0)))
        for k in ("mean_", "std_", "means_", "precisions_", "train_scores_"):
            setattr(det, k, np.asarray(state[k]))
        det.scale_ = standardization_scale(det.std_)
        if "threshold_" in state:
            det.calibration_scores_ = np.asarray(state["calibration_scores_"])
            det.threshold_, det.calibrated_ = float(state["threshold_"]), bool(state["calibrated_"])
        else:  # saved before calibration existed
            det.calibration_scores_, det.calibrated_ = det.train_scores_, False
            det.threshold_ = float(np.quantile(det.train_scores_, 1 - det.fpr, method="higher"))
        return det
