"""SHE (Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization with
Modern Hopfield Energy", ICLR 2023): a classifier is trained on the normal classes (labels are allowed for this
baseline); each class stores one pattern, the mean penultimate feature of its correctly classified training
images; a test image's simplified Hopfield energy is -<h(x), s_c> against the pattern s_c of its predicted class.
SHE's in-distribution score is <h(x), s_c>; this tool's anomaly score is its negation, the energy (higher = more
anomalous).
"""
from __future__ import annotations

import numpy as np

from .calibration import CalibratedDetector
from .errors import ConfigError, DataError


def she_patterns(h: np.ndarray, predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, D) stored patterns: per class, the mean of h (N, D) over its training images classified correctly
    (predicted (N,) == labels (N,)); a class with no correct image falls back to the mean over all its images, and
    a class with no image at all to zeros."""
    h, predicted, labels = np.asarray(h, dtype=np.float64), np.asarray(predicted), np.asarray(labels)
    out = np.zeros((n_classes, h.shape[1]))
    for c in range(n_classes):
        mine = labels == c
        correct = mine & (predicted == c)
        rows = correct if correct.any() else mine
        if rows.any():
            out[c] = h[rows].mean(axis=0)
    return out


def she_energy(h: np.ndarray, predicted: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """(M,) simplified Hopfield energy -<h_i, s_{predicted_i}> of features h (M, D) (higher = more anomalous)."""
    h = np.asarray(h, dtype=np.float64)
    return -(h * patterns[np.asarray(predicted)]).sum(axis=1)


class SHEDetector(CalibratedDetector):
    """SHE on a classifier's penultimate features.

    Parameters: weight (C, D) and bias (C,) of the trained classifier's last layer (the predicted class is
    argmax(h weight^T + bias)); seed, fpr, calibration_folds (the threshold, as for the other detectors).
    `fit(train, labels)` needs the normal training images' class ids 0..C-1. Fitted attributes: patterns_ (C, D),
    train_scores_, calibration_scores_, threshold_, calibrated_.
    """

    scorer = "she"

    def __init__(self, weight: np.ndarray, bias: np.ndarray, seed: int = 0, fpr: float = 0.05,
                 calibration_folds: int = 10):
        self.weight, self.bias = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
        if self.weight.ndim != 2 or self.bias.shape != (len(self.weight),) or len(self.weight) < 2:
            raise ConfigError(f"SHE needs a classifier over >= 2 normal classes: weight (C, D), bias (C,); got "
                              f"{self.weight.shape}, {self.bias.shape}")
        self.seed, self.fpr, self.calibration_folds = seed, fpr, calibration_folds

    def predict_class(self, feats: np.ndarray) -> np.ndarray:
        x = self._checked(feats, self.weight.shape[1])
        return np.argmax(x @ self.weight.T + self.bias, axis=1)

    def fit(self, train: np.ndarray, labels: np.ndarray | None = None) -> "SHEDetector":
        if labels is None:
            raise DataError("SHE is fitted with the normal training images' class labels (fit(train, labels))")
        return super().fit(train, labels)

    def _clone_uncalibrated(self) -> "SHEDetector":
        return SHEDetector(self.weight, self.bias, self.seed, self.fpr, 0)

    def _fit_model(self, x: np.ndarray, labels: np.ndarray | None) -> None:
        self.patterns_ = she_patterns(x, self.predict_class(x), labels, len(self.weight))

    def score(self, feats: np.ndarray) -> np.ndarray:
        if not hasattr(self, "patterns_"):
            raise ConfigError("SHEDetector.score called before fit")
        return she_energy(self._checked(feats, self.weight.shape[1]), self.predict_class(feats), self.patterns_)

    _STATE = ("weight", "bias", "seed", "fpr", "calibration_folds", "patterns_", "train_scores_",
              "calibration_scores_", "threshold_", "calibrated_")

    @classmethod
    def from_state_dict(cls, state: dict) -> "SHEDetector":
        det = cls(np.asarray(state["weight"]), np.asarray(state["bias"]), int(state["seed"]), float(state["fpr"]),
                  int(state["calibration_folds"]))
        det.patterns_ = np.asarray(state["patterns_"])
        det.train_scores_ = np.asarray(state["train_scores_"])
        det._restore_threshold(state)
        return det
