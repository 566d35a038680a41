"""BLISS (Goodge, Hooi, Ng: "When Text and Images Don't Mix: Bias-Correcting Language-Image Similarity Scores
for Anomaly Detection", BMVC 2024): a zero-shot score from image-text similarities, corrected for the bias of
each text embedding with statistics of the normal training images. No training of its own.

For normal class c with prompt embedding t_c ("This is a photo of a {label}") and dictionary entries d_j:

    internal_c(x) = -(sim(x, t_c) - mu_c) / sigma_c
    external(x)   = mean of the top-k values of (sim(x, d_j) - mu_j) / sigma_j over j
    s_c(x)        = internal_c(x) + lambda * external(x)
    score(x)      = min_c s_c(x)                    (higher = more anomalous)

mu, sigma: mean and std of each similarity over the normal training images. sim is the cosine similarity in a
joint image-text space: by default the images are mapped into the text model's space by a ridge regression from
the frozen trunk's features to the mean caption embedding of each normal training image (cmg_core.train.baselines);
the prompts and the dictionary are embedded by the text model itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .calibration import CalibratedDetector
from .errors import ConfigError, DataError
from .scoring import l2_normalize

DICTIONARY = Path(__file__).parent / "data" / "bliss_words.txt"


def load_dictionary(path: str | Path | None = None) -> list[str]:
    """The dictionary's entries: one per line, blank lines and `#` comments skipped. Default: the shipped list."""
    p = Path(path) if path else DICTIONARY
    if not p.is_file():
        raise DataError(f"BLISS dictionary {p} does not exist; expected a text file with one word or phrase per line")
    words = [w.strip() for w in p.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise DataError(f"BLISS dictionary {p} has no entries")
    return words


def class_prompts(labels: list[str], template: str = "This is a photo of a {label}") -> list[str]:
    """One prompt per class name; underscores become spaces."""
    if "{label}" not in template:
        raise ConfigError(f"bliss.prompt={template!r} must contain {{label}}")
    return [template.format(label=str(name).replace("_", " ")) for name in labels]


def bliss_scores(sim_classes: np.ndarray, sim_dict: np.ndarray, mu_classes: np.ndarray, sd_classes: np.ndarray,
                 mu_dict: np.ndarray, sd_dict: np.ndarray, k: int = 10, weight: float = 0.5) -> np.ndarray:
    """BLISS scores (N,) from similarities to the C class prompts (N, C) and the J dictionary entries (N, J), with the
    normal training images' means and stds (C,), (C,), (J,), (J,). Higher = more anomalous."""
    internal = -(np.asarray(sim_classes) - mu_classes) / sd_classes  # (N, C)
    z = (np.asarray(sim_dict) - mu_dict) / sd_dict  # (N, J)
    k = min(int(k), z.shape[1])
    external = -np.sort(-z, axis=1)[:, :k].mean(axis=1)  # (N,) mean of the top-k
    return (internal + weight * external[:, None]).min(axis=1)


class BLISSDetector(CalibratedDetector):
    """BLISS on image embeddings in a joint image-text space.

    Parameters: text (C + J, D) embeddings of the C class prompts followed by the J dictionary entries, in the same
    space as the image features; n_classes (C); k (top dictionary entries, default 10); weight (lambda, 0.5); seed,
    fpr, calibration_folds (the threshold, as for the other detectors). Fitted attributes: mean_, std_ (C + J,) of
    each similarity over the normal training images, train_scores_, calibration_scores_, threshold_, calibrated_.
    """

    scorer = "bliss"

    def __init__(self, text: np.ndarray, n_classes: int, k: int = 10, weight: float = 0.5, seed: int = 0,
                 fpr: float = 0.05, calibration_folds: int = 10, entries=None):
        self.text = np.asarray(text, dtype=np.float64)
        self.entries = np.asarray(entries if entries is not None else [f"#{i}" for i in range(len(self.text))],
                                  dtype=str)  # the prompts and dictionary words, for explanations
        self.n_classes = int(n_classes)
        self.k, self.weight = int(k), float(weight)
        self.seed, self.fpr, self.calibration_folds = seed, fpr, calibration_folds
        if self.text.ndim != 2 or not 1 <= self.n_classes < len(self.text):
            raise ConfigError(f"BLISS needs (C + J, D) text embeddings with 1 <= C < C + J; got {self.text.shape} "
                              f"and C={self.n_classes}")
        if self.k < 1:
            raise ConfigError(f"bliss.k={self.k}; expected >= 1 dictionary entries")

    def similarities(self, feats: np.ndarray) -> np.ndarray:
        """(M, D) image features -> (M, C + J) cosine similarities to the prompts and the dictionary."""
        x = self._checked(feats, self.text.shape[1])
        return l2_normalize(x) @ l2_normalize(self.text).T

    def _clone_uncalibrated(self) -> "BLISSDetector":
        return BLISSDetector(self.text, self.n_classes, self.k, self.weight, self.seed, self.fpr, 0, self.entries)

    def _fit_model(self, x: np.ndarray, labels: np.ndarray | None = None) -> None:
        sims = self.similarities(x)
        self.mean_ = sims.mean(axis=0)
        self.std_ = np.maximum(sims.std(axis=0), 1e-6)  # a constant similarity must not divide by 0

    def score(self, feats: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise ConfigError("BLISSDetector.score called before fit")
        s, c = self.similarities(feats), self.n_classes
        return bliss_scores(s[:, :c], s[:, c:], self.mean_[:c], self.std_[:c], self.mean_[c:], self.std_[c:],
                            self.k, self.weight)

    def top_entries(self, feats: np.ndarray, n: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the n dictionary entries (word, z-scored similarity) it matches most beyond what normal
        images do: the words behind the external score."""
        s, c = self.similarities(feats), self.n_classes
        z = (s[:, c:] - self.mean_[c:]) / self.std_[c:]
        order = np.argsort(-z, axis=1)[:, :n]
        return [[(str(self.entries[c + j]), float(z[i, j])) for j in row] for i, row in enumerate(order)]

    _STATE = ("text", "entries", "n_classes", "k", "weight", "seed", "fpr", "calibration_folds", "mean_", "std_",
              "train_scores_", "calibration_scores_", "threshold_", "calibrated_")

    @classmethod
    def from_state_dict(cls, state: dict) -> "BLISSDetector":
        det = cls(np.asarray(state["text"]), int(state["n_classes"]), int(state["k"]), float(state["weight"]),
                  int(state["seed"]), float(state["fpr"]), int(state["calibration_folds"]), state.get("entries"))
        det.mean_, det.std_ = np.asarray(state["mean_"]), np.asarray(state["std_"])
        det.train_scores_ = np.asarray(state["train_scores_"])
        det._restore_threshold(state)
        return det
