"""CMDA (Chen et al. 2023, "Cross-modal Data Augmentation"): SimCLR on views mixed with a partner image chosen and
weighted by the language modality, plus a small image-text alignment term.

The description leaves the mixing rule open; this tool's reading (config section `cmda`):

* partners: for each normal training image i, the `neighbors` training images j != i whose images match i's
  captions best, by E1's image-caption matching score (Eq.2): S_ij = cos(E1_img(x_j), E1_txt(captions of i));
* weights: w_ij = max_mix * clip(S_ij, 0, 1) - a partner that fits i's captions well is mixed in more;
* each SimCLR view of i is mixed with a view of one of its partners drawn at random: (1 - w) v_i + w v_j, in pixel
  space when E2 sees images (end2end profile) and on the cached trunk features in the frozen profile (which has no
  pixels per step);
* alignment: `align_weight` x the MSE between E2's linear map of h to the text space and i's mean caption
  embedding (the cmg-mse term, small).
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError


def cmda_partners(similarity: np.ndarray, k: int, max_mix: float) -> tuple[np.ndarray, np.ndarray]:
    """Partners (N, k) and mixing weights (N, k) from an image-caption similarity matrix (N, N), S[i, j] = match of
    image j with the captions of image i. The diagonal is never a partner; k is capped at N - 1."""
    s = np.asarray(similarity, dtype=np.float64)
    n = len(s)
    if s.shape != (n, n) or n < 2:
        raise ConfigError(f"CMDA needs a square (N, N) similarity matrix with N >= 2, got {s.shape}")
    if not 0 <= max_mix <= 1:
        raise ConfigError(f"cmda.max_mix={max_mix}; expected a weight in [0, 1]")
    k = min(max(int(k), 1), n - 1)
    masked = s.copy()
    np.fill_diagonal(masked, -np.inf)
    partners = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    weights = max_mix * np.clip(np.take_along_axis(s, partners, axis=1), 0.0, 1.0)
    return partners, weights


def draw_partners(partners: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For the batch rows idx (B,): one partner each, drawn uniformly among its k, and its weight: (B,), (B,)."""
    pick = torch.randint(partners.shape[1], (len(idx),), generator=gen)
    return partners[idx, pick], weights[idx, pick]


def mix(x: torch.Tensor, partner_x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1 - w) x + w partner_x, per row: x, partner_x (B, ...) images or features, w (B,)."""
    w = w.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (1 - w) * x + w * partner_x
