"""What every fitted scorer shares (`CalibratedDetector`): feature checks, `predict` on a threshold set by
cross-fitting, `percentile`, `describe_threshold` and the saved state.

The threshold is set at the false-positive rate `fpr`: each of `calibration_folds` folds of the normal training
features is scored by a detector fitted on the other folds, and the threshold is the (1 - fpr) quantile of these
out-of-fold scores. (A detector scores its own training points low - with N close to D Mahalanobis distances of
fitted points shrink, and a point is its own nearest neighbour - so a threshold on them flags far more than fpr of
new normal images.)

The scorers: cmg_core.detector (Mahalanobis, kNN; and `detector_from_state`, which knows every scorer),
cmg_core.bliss, cmg_core.she. This module imports none of them.
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import ConfigError, DataError


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
