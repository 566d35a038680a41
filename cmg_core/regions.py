"""The region grid of CMER and RID, without torch: an image is cut into an n x n grid (M = n^2 regions,
row-major) and masked variant m hides region m. `cmg_core.masks` builds the training tensors from these arrays;
the app draws its pictures from them (and so opens its pages without importing torch)."""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

__all__ = ["MASK_MODES", "grid_regions", "mask_arrays", "masked_pictures"]

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


def mask_arrays(height: int, width: int, n_regions: int, mode: str = "hard", soft_value: float = 0.1) -> np.ndarray:
    """``(M, H, W)`` float32 masks; mask m is 1 everywhere except region m, where it is 0 (``hard``) or
    ``soft_value`` (``soft``: the region's pixels are multiplied by a small constant).

    ``soft_value`` must lie in [0, 1) (only checked for ``soft``).
    """
    if mode not in MASK_MODES:
        raise ConfigError(f"mask mode={mode!r} is unknown (expected one of {MASK_MODES})")
    if mode == "soft" and not 0.0 <= float(soft_value) < 1.0:
        raise ConfigError(f"soft_value={soft_value} must lie in [0, 1)")
    value = 0.0 if mode == "hard" else float(soft_value)
    regions = grid_regions(height, width, n_regions)
    masks = np.ones((len(regions), height, width), dtype=np.float32)
    for m, (y0, y1, x0, x1) in enumerate(regions):
        masks[m, y0:y1, x0:x1] = value
    return masks


def masked_pictures(image: np.ndarray, n_regions: int, mode: str = "hard", soft_value: float = 0.1) -> np.ndarray:
    """The M masked variants of one picture: ``image (H, W, C)`` uint8 -> ``(M, H, W, C)`` uint8, region m hidden
    in variant m (pixel x mask, as `masks.apply_masks` does for training, rounded back to uint8)."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ConfigError(f"expected a picture (H, W, C), got shape {arr.shape}")
    masks = mask_arrays(arr.shape[0], arr.shape[1], n_regions, mode, soft_value)
    out = (arr.astype(np.float32) / 255.0)[None] * masks[..., None]
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
