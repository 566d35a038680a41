"""Region masks for CMER (cross-modal entropy reduction) and RID (region identification), as tensors.

An image is cut into an n x n grid (M = n^2 regions, row-major; the geometry is `cmg_core.regions`); masked
variant m hides region m. Pure functions, tensors in/out.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import ConfigError
from .regions import mask_arrays

__all__ = ["grid_masks", "apply_masks", "select_masked", "cmer_labels"]


def grid_masks(
    height: int, width: int, n_regions: int, mode: str = "hard", soft_value: float = 0.1
) -> torch.Tensor:
    """``(M, 1, H, W)`` float32 masks; mask m is 1 everywhere except region m, where it is 0 (``hard``)
    or ``soft_value`` (``soft``) — `regions.mask_arrays` as a tensor."""
    return torch.from_numpy(mask_arrays(height, width, n_regions, mode, soft_value)).unsqueeze(1)


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
