"""Analysis helpers for figures: 2-D embeddings of features (t-SNE / UMAP) and distance correlation.

numpy in, numpy / pandas out.  Heavy libraries (sklearn.manifold, umap) are imported on use.  Distance
correlation is computed here (scipy's pdist, then the centring of each definition) rather than with the `dcor`
package: `import dcor` compiles its numba kernels, 41 s in a fresh environment on 2 cores and several seconds in
every later process, far longer than the statistic on the few hundred images of a figure; the two agree to 1e-14
(dcor 0.7, biased and bias-corrected, N 7-200, D 1-3072).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist, squareform

from .errors import ConfigError, DataError
from .utils import atomic_path, cache_dir, load_npz

__all__ = ["EMBED_METHODS", "embed_2d", "dcor_matrix", "latent_map", "cached_latent_map"]

EMBED_METHODS = ("tsne", "umap")


def _features(X: np.ndarray, name: str = "X") -> np.ndarray:
    a = np.asarray(X, dtype=np.float64)
    if a.ndim != 2:
        raise DataError(f"{name} must be a 2-D (N, D) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name} contains NaN or inf values ({int((~np.isfinite(a)).any(axis=1).sum())} rows)")
    return a


def embed_2d(X: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``X (N, D)`` -> ``(N, 2)`` float64 coordinates with sklearn ``TSNE`` or ``umap.UMAP``.

    t-SNE uses PCA initialisation and perplexity ``min(30, (N - 1) / 3)`` (sklearn requires
    perplexity < N) and runs single-threaded; UMAP uses ``n_neighbors = min(15, N - 1)``.  Both are seeded
    with `seed`.
    """
    if method not in EMBED_METHODS:
        raise ConfigError(f"embedding method {method!r} is unknown; expected one of {list(EMBED_METHODS)}")
    a = _features(X)
    n = a.shape[0]
    if n < 3:
        raise DataError(f"a 2-D embedding needs at least 3 points, got {n}")
    if method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
        # one OpenMP thread: for the few thousand points shown here, sklearn's spin-waiting threads are
        # several times slower on a busy 2-core machine (600 points: 3.5 s vs 14 s with 2 threads)
        with threadpool_limits(limits=1):
            out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(a)
    else:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(15, n - 1)), random_state=seed)
        out = reducer.fit_transform(a)
    return np.asarray(out, dtype=np.float64)


LATENT_FORMAT = 1  # bump when embed_2d's settings change: maps cached under the old ones are then recomputed


def subsample_rows(n: int, max_points: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded sample of `max_points` of `n` rows; all rows when n <= max_points (or None)."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def latent_map(X: np.ndarray, method: str = "tsne", seed: int = 0,
               max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, coords)``: `embed_2d` of the rows of ``X (N, D)``, of a seeded sample of `max_points` of them
    when N is larger (rows: the sample's row numbers, sorted; coords: ``(len(rows), 2)``)."""
    rows = subsample_rows(len(X), max_points, seed)
    return rows, embed_2d(np.asarray(X)[rows], method, seed=seed)


def latent_key(X: np.ndarray, method: str = "tsne", seed: int = 0, max_points: int | None = None) -> str:
    """sha256 hex of the features' content (values, shape, dtype) and the map's settings: `cached_latent_map`'s key."""
    a = np.ascontiguousarray(X)
    settings = {"format": LATENT_FORMAT, "method": method, "seed": int(seed), "max_points": max_points,
                "shape": list(a.shape), "dtype": a.dtype.str}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def cached_latent_map(X: np.ndarray, method: str = "tsne", seed: int = 0, max_points: int | None = None,
                      folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """`latent_map` computed once per features content and settings (`latent_key`), then read back.

    Stored as ``<key>.npz`` under `folder` (default ``cmg_core.utils.cache_dir("latent")``, i.e.
    ``$CMG_CACHE_DIR/latent``), never next to the features. A cache file that cannot be read is recomputed; a
    cache folder that cannot be written only costs the reuse. Returns ``(rows, coords, from_cache)``."""
    key = latent_key(X, method, seed, max_points)
    try:
        path = Path(folder) / f"{key}.npz" if folder is not None else cache_dir("latent") / f"{key}.npz"
    except OSError:  # no writable cache folder: compute, keep nothing
        return (*latent_map(X, method, seed, max_points), False)
    if path.is_file():
        try:
            z = load_npz(path)
            rows, coords = z["rows"].astype(int), z["coords"].astype(np.float64)
            if coords.shape == (len(rows), 2):
                return rows, coords, True
        except (DataError, KeyError):
            pass
    rows, coords = latent_map(X, method, seed, max_points)
    try:
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=rows, coords=coords)
    except OSError:
        pass
    return rows, coords, False


def double_centred_distances(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> ``(N, N)`` Euclidean distance matrix with row, column and grand means removed:
    A_ij = a_ij - a_i. - a_.j + a_.. (Szekely, Rizzo & Bakirov 2007, Eq.2.8)."""
    d = squareform(pdist(x))
    return d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()


def u_centred_distances(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> ``(N, N)`` U-centred distance matrix, N >= 4: a_ij - a_i./(N-2) - a_.j/(N-2) + a_../((N-1)(N-2))
    off the diagonal (sums, not means), 0 on it (Szekely & Rizzo 2014, Eq.3.2)."""
    d = squareform(pdist(x))
    n = len(d)
    u = (d - d.sum(axis=0, keepdims=True) / (n - 2) - d.sum(axis=1, keepdims=True) / (n - 2)
         + d.sum() / ((n - 1) * (n - 2)))
    np.fill_diagonal(u, 0.0)
    return u


def distance_correlation(a: np.ndarray, b: np.ndarray, unbiased: bool = False) -> float:
    """Distance correlation from two ``(N, N)`` centred distance matrices of the same N samples.

    Double-centred (`double_centred_distances`): dCor = sqrt(dCov^2(a, b) / sqrt(dVar^2(a) dVar^2(b))), with
    dCov^2 = mean(A * B).  U-centred (`u_centred_distances`, ``unbiased=True``): the bias-corrected *squared*
    statistic, the same ratio of sum(A * B) / (N (N - 3)), not square-rooted (it can be slightly negative).
    0 when either variable has no spread."""
    dvar = float(np.sum(a * a) * np.sum(b * b))
    if dvar <= 0:
        return 0.0
    r = float(np.sum(a * b)) / np.sqrt(dvar)  # the normalisation 1/N^2 or 1/(N(N-3)) cancels
    return r if unbiased else float(np.sqrt(max(r, 0.0)))


def dcor_matrix(arrays: dict[str, np.ndarray], bias_corrected: bool = False) -> pd.DataFrame:
    """Pairwise distance correlation (`distance_correlation`) between named ``(N, D_i)`` arrays.

    Rows are samples (all arrays need the same N; D may differ).  Returns a symmetric
    ``len(arrays) x len(arrays)`` DataFrame indexed and labelled by the names, 1 on the diagonal.

    ``bias_corrected=True`` uses the bias-corrected squared statistic (U-centred distances, N >= 4) instead (it can
    be slightly negative): plain dCor tends to 1 for ANY pair of high-dimensional vectors when N is small
    (Szekely & Rizzo 2013), e.g. flattened pixels vs. white noise.
    """
    if len(arrays) < 1:
        raise DataError("dcor_matrix needs at least one named array")
    names = list(arrays)
    mats = {k: _features(np.asarray(v).reshape(len(v), -1), k) for k, v in arrays.items()}
    sizes = {k: m.shape[0] for k, m in mats.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"dcor_matrix needs the same number of samples in every array, got {sizes}")
    n = next(iter(sizes.values()))
    if n < (4 if bias_corrected else 2):
        raise DataError(f"dcor_matrix needs at least {4 if bias_corrected else 2} samples"
                        f"{' for the bias-corrected statistic' if bias_corrected else ''}, got {n}")
    centre = u_centred_distances if bias_corrected else double_centred_distances
    centred = {k: centre(m) for k, m in mats.items()}
    out = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            v = distance_correlation(centred[names[i]], centred[names[j]], unbiased=bias_corrected)
            out[i, j] = out[j, i] = v
    return pd.DataFrame(out, index=names, columns=names)
