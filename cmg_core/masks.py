"""Region masks for CMER (cross-modal entropy reduction) and RID (region identification).

An image is cut into an n x n grid (M = n^2 regions, row-major); masked variant m hides region m.
Pure functions; tensors in/out except :func:`grid_regions`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["grid_regions", "grid_masks", "apply_masks", "select_masked", "cmer_labels"]

MASK_MODES = ("hard", "soft")


def _grid_side(n_regions: int) -> int:
    if isinstance(n_regions, bool) or not isinstance(n_regions, (int, np.integer)):
        raise ConfigError(f"the number of regions M={n_regions!r} must be an int square number (expected 4, 9, 16, ...)")
    n = math.isqrt(int(n_regions)) if n_regions >= 0 else -1
    if n_regions < 1 or n * n != n_regions:
        raise ConfigError(f"the number of regions M={n_regions} is not a square number (expected 4, 9, 16, ...)")
    return n


def _edges(size: int, n: int) -> list[int]:
    return [int(v) for v in np.rint(np.linspace(0, size, n + 1))]


def grid_regions(height: int, width: int, n_regions: int) -> list[tuple[int, int, int, int]]:
    """The M = n x n grid cells of an ``height x width`` image as ``(y0, y1, x0, x1)`` half-open boxes,
    row-major (region m is row ``m // n``, column ``m % n``).

    Edges are ``round(linspace(0, size, n + 1))`` (numpy rounding, half to even), so the cells tile the
    image exactly even when the size is not divisible by n (e.g. 7 px in 2 cells: 0-4, 4-7).
    Raises ConfigError if M is not a square >= 1 or the image is smaller than the grid.
    """
    n = _grid_side(n_regions)
    if height < n or width < n:
        raise ConfigError(f"image of {height}x{width} px is too small for a {n}x{n} grid (M={n_regions})")
    ys, xs = _edges(height, n), _edges(width, n)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(n) for c in range(n)]


def grid_masks(
    height: int, width: int, n_regions: int, mode: str = "hard", soft_value: float = 0.1
) -> torch.Tensor:
    """``(M, 1, H, W)`` float32 masks; mask m is 1 everywhere except region m, where it is 0 (``hard``)
    or ``soft_value`` (``soft``: the region's pixels are multiplied by a small constant).

    ``soft_value`` must lie in [0, 1) (only checked for ``soft``).
    """
    if mode not in MASK_MODES:
        raise ConfigError(f"mask mode={mode!r} is unknown (expected one of {MASK_MODES})")
    if mode == "soft" and not 0.0 <= float(soft_value) < 1.0:
        raise ConfigError(f"soft_value={soft_value} must lie in [0, 1)")
    value = 0.0 if mode == "hard" else float(soft_value)
    regions = grid_regions(height, width, n_regions)
    masks = torch.ones(len(regions), 1, height, width, dtype=torch.float32)
    for m, (y0, y1, x0, x1) in enumerate(regions):
        masks[m, :, y0:y1, x0:x1] = value
    return masks


def apply_masks(
    images: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Every image under every mask: ``images (B, C, H, W)``, ``masks (M, 1, H, W)`` -> ``(B, M, C, H, W)``.

    ``out = images * mask`` when ``fill`` is None.  ``fill (C,)`` is the value, in the image's own
    space, that a fully masked pixel takes: ``out = images * mask + fill * (1 - mask)``.  Pass the
    normalised value of black (``-mean / std`` per channel) so that masking means "black pixels" for
    images normalised with ImageNet statistics.
    """
    if images.dim() != 4 or masks.dim() != 4 or masks.shape[1] != 1:
        raise ConfigError(f"expected images (B, C, H, W) and masks (M, 1, H, W), got {tuple(images.shape)} and {tuple(masks.shape)}")
    if images.shape[-2:] != masks.shape[-2:]:
        raise ConfigError(f"images are {tuple(images.shape[-2:])} px but masks are {tuple(masks.shape[-2:])} px")
    m = masks.to(device=images.device, dtype=images.dtype).unsqueeze(0)  # (1, M, 1, H, W)
    out = images.unsqueeze(1) * m  # (B, M, C, H, W)
    if fill is not None:
        f = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
        if f.numel() != images.shape[1]:
            raise ConfigError(f"fill has {f.numel()} values but images have C={images.shape[1]} channels")
        out = out + f.view(1, 1, -1, 1, 1) * (1.0 - m)
    return out


def select_masked(variants: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick one variant per image: ``variants (B, M, C, H, W)``, ``index (B,)`` long -> ``(B, C, H, W)``."""
    if variants.dim() < 2 or index.shape != (variants.shape[0],):
        raise ConfigError(f"expected variants (B, M, ...) and index (B,), got {tuple(variants.shape)} and {tuple(index.shape)}")
    idx = index.to(variants.device).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= variants.shape[1]):
        raise ConfigError(f"index values must lie in 0..{variants.shape[1] - 1}, got {idx.tolist()}")
    return variants[torch.arange(variants.shape[0], device=variants.device), idx]


def cmer_labels(scores: torch.Tensor) -> torch.Tensor:
    """CMER's label l: ``argmax_m scores (B, M)`` -> ``(B,)`` long, the masked variant whose image
    embedding matches the caption best (Eq. 2 scores)."""
    if scores.dim() != 2:
        raise ConfigError(f"scores must be (B, M), got {tuple(scores.shape)}")
    return scores.argmax(dim=1).long()
