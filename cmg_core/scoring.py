"""The numerics of SSD-style (cluster-)Mahalanobis scores (paper Eq. 14): Gaussians, their precisions, distances.

numpy in / numpy out.  `cmg_core.detector.MahalanobisDetector` builds SSD (Sehwag et al., 2021) from them:
L2-normalise, z-score with the training mean/std, then score a test point by its smallest Mahalanobis distance
to the Gaussians fitted on k-means clusters of the training features.  Higher score = more anomalous.
(tests/reference.py keeps SSD's one-shot form, `ssd_scores`, that the detector is checked against.)

One departure from SSD's ``(x - mean) / (std + 1e-10)``: a (near-)constant training feature (a dead ReLU
channel) is not divided by its ~0 std, see :func:`standardization_scale`; the detector uses the same rule.
"""
from __future__ import annotations

import numpy as np
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from .errors import ConfigError, DataError

__all__ = [
    "COVARIANCES",
    "l2_normalize",
    "standardization_scale",
    "fit_gaussian",
    "mahalanobis_sq",
    "precision_factor",
    "ledoit_wolf_shrinkage_gram",
    "factored_mahalanobis_sq",
]

COVARIANCES = ("pinv", "shrinkage", "empirical")
EPS = 1e-10
STD_RTOL = 1e-3  # a feature whose std is below STD_RTOL x the typical std counts as constant


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise DataError(f"{name} must be a 2-D (N, D) feature array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise DataError(f"{name} contains NaN or inf values ({bad} of {a.shape[0]} rows)")
    return a


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (N, D)`` divided by their L2 norm + 1e-10 (SSD's convention)."""
    a = np.asarray(x, dtype=np.float64)
    return a / (np.linalg.norm(a, axis=-1, keepdims=True) + EPS)


def standardization_scale(std: np.ndarray, rtol: float = STD_RTOL) -> np.ndarray:
    """Per-feature divisors ``(D,)`` for z-scoring features whose training std is ``std (D,)``.

    A feature is divided by its own std, except a (near-)constant one, ``std <= rtol * typical`` with
    ``typical = sqrt(mean(std ** 2))`` (the RMS std over the features): it is divided by ``typical``.
    This is sklearn's rule (``StandardScaler`` leaves a near-constant feature unscaled, see
    ``sklearn.preprocessing._data._handle_zeros_in_scale``) with two changes: "near-constant" is judged
    relative to the other features rather than to machine epsilon, and "unscaled" means the features' common
    scale, ``typical``, rather than 1 (L2-normalised features have stds of about 1/sqrt(D)).  So a dead ReLU
    channel (0 on every training image, slightly > 0 on a test image) weighs like an ordinary feature
    instead of being multiplied by 1e10; no feature is scaled up by more than ``1 / rtol`` relative to the
    others.  If every feature is constant (``typical == 0``) every divisor is 1.  Used by
    :class:`cmg_core.detector.MahalanobisDetector`.
    """
    s = np.asarray(std, dtype=np.float64)
    typical = float(np.sqrt(np.mean(s**2))) if s.size else 0.0
    if not typical > 0:
        return np.ones_like(s)
    return np.where(s > rtol * typical, s, typical)


def fit_gaussian(train: np.ndarray, covariance: str = "pinv") -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and precision ``(D, D)`` of ``train (N, D)``.

    * ``pinv``: ``np.linalg.pinv`` of the biased covariance (``np.cov(bias=True)``), as SSD.
    * ``shrinkage``: sklearn ``LedoitWolf`` precision.
    * ``empirical``: sklearn ``EmpiricalCovariance`` precision (a pseudo-inverse as well).
    A singular covariance (N <= D, duplicates) is fine: every option uses a pseudo-inverse.
    """
    x = _as_2d(train, "train")
    if covariance not in COVARIANCES:
        raise ConfigError(f"covariance={covariance!r} is unknown (expected one of {COVARIANCES})")
    if x.shape[0] < 2:
        raise ConfigError(f"a Gaussian needs at least N=2 training features, got N={x.shape[0]}")
    mean = x.mean(axis=0)
    if covariance == "pinv":
        cov = np.atleast_2d(np.cov(x.T, bias=True))
        precision = np.linalg.pinv(cov)
    elif covariance == "shrinkage":
        precision = LedoitWolf().fit(x).precision_
    else:
        precision = EmpiricalCovariance().fit(x).precision_
    return mean, np.asarray(precision, dtype=np.float64)


def precision_factor(train: np.ndarray, covariance: str = "shrinkage") -> tuple[np.ndarray, float, float, np.ndarray] | None:
    """`fit_gaussian`'s precision P of ``train (N, D)`` in factored form when N < D, without forming a (D, D)
    matrix: ``(mean (D,), alpha, sign, W (R, D))`` with ``d P d^T = alpha |d|^2 + sign |W d|^2`` for ``d = y - mean``
    (R <= N); None when N >= D (the dense P is no larger) or the estimate is degenerate.

    * ``shrinkage``: Ledoit-Wolf's ``a I + b U^T U`` (``U = (train - mean) / sqrt(N)``, ``a = s mu``, ``b = 1 - s``,
      s: `ledoit_wolf_shrinkage_gram`) inverted by Woodbury:
      ``P = (I - U^T (a/b I + U U^T)^-1 U) / a``, so alpha = 1/a, sign = -1, ``W = L^-1 U / sqrt(a)`` with
      ``L L^T = a/b I + U U^T`` (an (N, N) Cholesky factor).
    * ``pinv`` / ``empirical``: the pseudo-inverse of ``U^T U`` from the SVD ``U = Q S V^T``: alpha = 0, sign = +1,
      ``W = S^-1 V^T`` over the singular values numpy's pinv (rcond 1e-15 of the covariance) or scipy's pinvh
      (D eps) would keep.
    """
    x = _as_2d(train, "train")
    if covariance not in COVARIANCES:
        raise ConfigError(f"covariance={covariance!r} is unknown (expected one of {COVARIANCES})")
    n, d = x.shape
    if n < 2 or n >= d:
        return None
    mean = x.mean(axis=0)
    u = (x - mean) / np.sqrt(n)
    if covariance == "shrinkage":
        from scipy.linalg import cho_factor, solve_triangular

        shrink = ledoit_wolf_shrinkage_gram(x - mean)
        mu = float((u * u).sum()) / d  # trace of the empirical covariance / D
        a, b = shrink * mu, 1.0 - shrink
        if not a > 0 or not b > 0:
            return None
        try:
            chol, _ = cho_factor(a / b * np.eye(n) + u @ u.T, lower=True)
        except np.linalg.LinAlgError:  # a / b below rounding of U U^T (next to no shrinkage): the dense pinvh
            return None
        return mean, 1.0 / a, -1.0, solve_triangular(np.tril(chol), u, lower=True) / np.sqrt(a)
    _, sv, vt = np.linalg.svd(u, full_matrices=False)
    rtol = 1e-15 if covariance == "pinv" else d * np.finfo(np.float64).eps
    keep = sv**2 > rtol * (sv[0] ** 2 if len(sv) else 0.0)
    return mean, 0.0, 1.0, vt[keep] / sv[keep, None]


def ledoit_wolf_shrinkage_gram(centered: np.ndarray) -> float:
    """sklearn's `ledoit_wolf_shrinkage` of centered rows ``(N, D)`` without its (D, D) products: the same sums
    from ``sum(X2^T X2) = |X2 1|^2`` (X2 = X * X) and ``|X^T X|_F = |X X^T|_F`` (an (N, N) Gram matrix), so it
    costs O(N^2 D), not O(N D^2)."""
    x = np.asarray(centered, dtype=np.float64)
    n, d = x.shape
    if d == 1:
        return 0.0
    x2 = x * x
    trace = x2.sum(axis=0) / n  # (D,) the empirical covariance's diagonal
    mu = trace.sum() / d
    beta_ = float((x2.sum(axis=1) ** 2).sum())
    delta_ = ((x @ x.T) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace.sum() + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def factored_mahalanobis_sq(x: np.ndarray, mean: np.ndarray, alpha: float, sign: float, w: np.ndarray) -> np.ndarray:
    """``(M,)`` squared Mahalanobis distances of ``x (M, D)`` under a `precision_factor` ``(mean, alpha, sign, W)``:
    ``alpha |x - mean|^2 + sign |W (x - mean)^T|^2``; zero rows of W (padding) add nothing."""
    dx = np.asarray(x, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    proj = dx @ np.asarray(w, dtype=np.float64).T  # (M, R)
    return alpha * np.einsum("md,md->m", dx, dx) + sign * np.einsum("mr,mr->m", proj, proj)


def mahalanobis_sq(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances ``(x_m - mean)^T P (x_m - mean)`` of ``x (M, D)`` -> ``(M,)``."""
    a = np.asarray(x, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64).reshape(-1)
    p = np.asarray(precision, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != mu.shape[0] or p.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"expected x (M, D), mean (D,), precision (D, D); got {a.shape}, {mu.shape}, {p.shape}")
    d = a - mu
    return np.einsum("md,md->m", d @ p, d)  # BLAS matmul; a 3-operand einsum would loop in C without it
