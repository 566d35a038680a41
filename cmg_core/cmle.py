"""CMLE (cross-modal linear embedding): caption clusters and LLE weights in text space.

The paper clusters caption embeddings with a GMM (K = 5), then, inside each cluster, expresses every
caption embedding as an affine combination of its neighbours (LLE, Eq. 9-12).  The image encoder is
then trained so that image embeddings keep those weights (Eq. 13, see
:func:`cmg_core.losses.lle_reconstruction_loss`).  numpy / scipy / sklearn in and out.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from .errors import ConfigError

__all__ = [
    "fit_caption_clusters",
    "barycentric_weights",
    "lle_weight_matrix",
    "cmle_weights",
    "neighbour_batch_indices",
    "batch_weight_block",
]


def fit_caption_clusters(
    text_emb: np.ndarray,
    n_clusters: int = 5,
    covariance_type: str = "diag",
    seed: int = 0,
    reg_covar: float = 1e-4,
) -> tuple[np.ndarray, GaussianMixture]:
    """GMM clustering of caption embeddings ``text_emb (N, D)``: returns ``(labels (N,), gmm)``.

    Uses ``sklearn.mixture.GaussianMixture`` (EM); ``covariance_type="diag"`` and ``reg_covar`` keep
    it stable in high dimension with few captions.  Some of the K components may end up empty.
    """
    x = np.asarray(text_emb, dtype=np.float64)
    if x.ndim != 2:
        raise ConfigError(f"text_emb must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if int(n_clusters) < 1 or int(n_clusters) > n:
        raise ConfigError(f"GMM needs 1 <= K <= N: K={n_clusters} clusters but only N={n} caption embeddings")
    if covariance_type not in ("full", "tied", "diag", "spherical"):
        raise ConfigError(f"covariance_type={covariance_type!r} is unknown (expected full, tied, diag, spherical)")
    gmm = GaussianMixture(
        n_components=int(n_clusters), covariance_type=covariance_type, random_state=seed, reg_covar=reg_covar
    )
    labels = gmm.fit_predict(x)
    return labels.astype(np.int64), gmm


def batch_caption_clusters(text_emb: np.ndarray, n_clusters: int = 5, seed: int = 0) -> np.ndarray:
    """(B,) labels of a GMM (full covariance, as the released code's per-mini-batch `GaussianMixture(5)`) fitted
    on one mini-batch's caption embeddings ``text_emb (B, D)``; K is capped at B. Some labels may be unused."""
    x = np.asarray(text_emb, dtype=np.float64)
    k = max(1, min(int(n_clusters), len(x)))
    gmm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed)
    return gmm.fit_predict(x).astype(np.int64)


def barycentric_weights(x: np.ndarray, neighbors: np.ndarray, reg: float = 1e-3) -> np.ndarray:
    """Eq. 9-12: weights ``w (k,)`` with ``sum(w) = 1`` minimising ``||x - sum_j w_j n_j||^2``.

    ``x (D,)``, ``neighbors (k, D)``.  Local Gram ``G = (x - N)(x - N)^T``, regularised as sklearn's
    ``barycenter_weights``: ``G += R I`` with ``R = reg * trace(G)`` (``R = reg`` when the trace is 0,
    e.g. all neighbours are duplicates of x); then ``w = solve(G, 1)``, ``w /= sum(w)``.
    """
    x = np.asarray(x, dtype=np.float64)
    nb = np.asarray(neighbors, dtype=np.float64)
    if x.ndim != 1 or nb.ndim != 2 or nb.shape[1] != x.shape[0] or nb.shape[0] < 1:
        raise ConfigError(f"expected x (D,) and neighbors (k>=1, D), got {x.shape} and {nb.shape}")
    c = nb - x
    g = c @ c.T
    trace = np.trace(g)
    g.flat[:: nb.shape[0] + 1] += reg * trace if trace > 0 else reg
    ones = np.ones(nb.shape[0])
    try:
        w = scipy.linalg.solve(g, ones, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):  # reg=0 and a singular G
        w = np.linalg.lstsq(g, ones, rcond=None)[0]
    return w / np.sum(w)


def lle_weight_matrix(emb: np.ndarray, n_neighbors: int | None = 10, reg: float = 1e-3) -> np.ndarray:
    """LLE weights of a set of points ``emb (n, D)`` -> ``W (n, n)``, zero diagonal, rows sum to 1.

    Row i holds :func:`barycentric_weights` of point i over its ``n_neighbors`` nearest other members
    (sklearn ``NearestNeighbors``, Euclidean; a point is never its own neighbour, even with duplicates).
    ``n_neighbors=None`` uses every other member of the set, as the paper writes Eq. 9.
    Fallback: if the set has fewer than ``n_neighbors`` other members, all ``n - 1`` are used and a
    warning names the numbers; a singleton set gets an all-zero row (no neighbours; such rows are
    excluded from L_global).
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ConfigError(f"emb must be (n>=1, D), got shape {x.shape}")
    n = x.shape[0]
    w = np.zeros((n, n), dtype=np.float64)
    if n == 1:
        return w
    if n_neighbors is None:
        k = n - 1
    else:
        if int(n_neighbors) < 1:
            raise ConfigError(f"n_neighbors={n_neighbors} must be >= 1 (or None for all other members)")
        k = int(n_neighbors)
        if k > n - 1:
            warnings.warn(
                f"LLE: a set of n={n} points has only {n - 1} other members, fewer than n_neighbors={k}; "
                f"using all {n - 1}",
                stacklevel=2,
            )
            k = n - 1
    if k == n - 1:
        ind = np.array([[j for j in range(n) if j != i] for i in range(n)], dtype=np.int64)
    else:
        ind = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)
    for i in range(n):
        w[i, ind[i]] = barycentric_weights(x[i], x[ind[i]], reg=reg)
    return w


def cmle_weights(
    text_emb: np.ndarray, cluster_labels: np.ndarray, n_neighbors: int | None = 10, reg: float = 1e-3
) -> sp.csr_matrix:
    """Block-structured LLE weights over all captions: ``text_emb (N, D)``, ``cluster_labels (N,)`` ->
    ``W (N, N)`` CSR.  ``W[i, j] != 0`` only when i and j share a cluster; each cluster's block is
    :func:`lle_weight_matrix`; rows sum to 1 except for singleton clusters (all-zero rows).
    Small-cluster fallbacks are reported in one warning naming the clusters.
    """
    x = np.asarray(text_emb, dtype=np.float64)
    lab = np.asarray(cluster_labels).reshape(-1)
    if x.ndim != 2 or lab.shape[0] != x.shape[0]:
        raise ConfigError(f"expected text_emb (N, D) and cluster_labels (N,), got {x.shape} and {lab.shape}")
    n = x.shape[0]
    rows, cols, vals, notes = [], [], [], []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block = lle_weight_matrix(x[idx], n_neighbors=n_neighbors, reg=reg)
        if caught or idx.size == 1:
            notes.append(f"cluster {c} (size {idx.size})")
        r, q = np.nonzero(block)
        rows.append(idx[r])
        cols.append(idx[q])
        vals.append(block[r, q])
    if notes:
        warnings.warn(
            f"CMLE: clusters with fewer than n_neighbors={n_neighbors} other members use all of them, "
            f"singletons get no neighbours: {', '.join(notes)}",
            stacklevel=2,
        )
    def cat(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return sp.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))), shape=(n, n))


def neighbour_batch_indices(
    weights: sp.csr_matrix, batch_seed_idx: np.ndarray, max_size: int | None = None
) -> np.ndarray:
    """Neighbour-aware batch: the anchors ``batch_seed_idx (b,)`` followed by their LLE neighbours.

    Returns unique int64 indices: first the anchors (duplicates removed, order kept), then the
    neighbours (non-zero columns of the anchors' rows of ``weights``) in order of appearance.  With
    ``max_size`` the list is cut to that length (anchors first, then neighbours), so some anchors may
    lose neighbours; :func:`batch_weight_block` then drops those rows from L_global.
    """
    w = sp.csr_matrix(weights)
    seeds = np.asarray(batch_seed_idx, dtype=np.int64).reshape(-1)
    if seeds.size and (seeds.min() < 0 or seeds.max() >= w.shape[0]):
        raise ConfigError(f"batch indices must lie in 0..{w.shape[0] - 1}")
    if max_size is not None and int(max_size) < 1:
        raise ConfigError(f"max_size={max_size} must be >= 1 (or None)")
    order: dict[int, None] = dict.fromkeys(seeds.tolist())
    for i in seeds.tolist():
        row = slice(w.indptr[i], w.indptr[i + 1])
        nbrs = w.indices[row][w.data[row] != 0]
        order.update(dict.fromkeys(nbrs.tolist()))
    out = np.fromiter(order.keys(), dtype=np.int64, count=len(order))
    return out if max_size is None else out[: int(max_size)]


def batch_weight_block(weights: sp.csr_matrix, indices: np.ndarray) -> np.ndarray:
    """``W[indices][:, indices]`` as a dense ``(b, b)`` float32 array, for
    ``lle_reconstruction_loss(z_batch, block, z_batch)``.

    A row is kept only when all of its neighbours are inside ``indices`` (its weights then still sum
    to 1); rows with a neighbour missing from the batch are zeroed, i.e. excluded from L_global.
    """
    w = sp.csr_matrix(weights)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    sub_rows = w[idx]
    block = sub_rows[:, idx].toarray()
    sub_rows.eliminate_zeros()
    complete = (block != 0).sum(axis=1) == np.diff(sub_rows.indptr)
    block[~complete] = 0.0
    return block.astype(np.float32)
