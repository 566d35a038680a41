"""Images given as arrays (what a NumPy / PyTorch user holds): an (N, H, W, 3) or (N, H, W) array, uint8 or float
in [0, 1], or a sequence of such (H, W[, 3]) arrays and PIL images. `fit(arrays)` stores them once as PNG files
in a content-addressed folder of the cache, so a run folder lists real image files like any other."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils import atomic_path, cache_dir

EXPECTED = ("an (N, H, W, 3) or (N, H, W) array (uint8, or float in [0, 1]), or a list of (H, W[, 3]) arrays "
            "and PIL images")


def is_array_batch(images: Any) -> bool:
    """Whether `images` is an array batch (NumPy, or anything with `__array__`, e.g. a torch tensor) or a
    sequence holding arrays or PIL images, rather than image paths."""
    if hasattr(images, "__array__"):
        return True
    return isinstance(images, (list, tuple)) and any(hasattr(x, "__array__") or isinstance(x, Image.Image)
                                                     for x in images)


def scoring_inputs(images: Any) -> list:
    """What the Predictor scores: an array batch as PIL images; in a list, arrays become PIL images and paths
    and PIL images stay as they are."""
    if hasattr(images, "__array__") and not isinstance(images, Image.Image):
        return pil_images(images)
    return [Image.fromarray(to_uint8_rgb(x, f"image {i}")) if hasattr(x, "__array__") and
            not isinstance(x, Image.Image) else x for i, x in enumerate(images)]


def to_uint8_rgb(x: np.ndarray, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 of one (H, W) / (H, W, 1) / (H, W, 3) array, uint8 or float in [0, 1]; DataError else."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] != 3 or min(x.shape[:2]) < 1:
        raise DataError(f"{what} has shape {x.shape}; expected {EXPECTED}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError(f"{what} holds float values outside [0, 1] (or NaN); expected {EXPECTED}")
        return np.round(x * 255).astype(np.uint8)
    raise DataError(f"{what} has dtype {x.dtype}; expected {EXPECTED}")


def pil_images(images: Any) -> list[Image.Image]:
    """RGB PIL images of an array batch or a sequence of arrays / PIL images (`EXPECTED`)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise DataError(f"no images given; expected {EXPECTED}")
        return [x.convert("RGB") if isinstance(x, Image.Image) else
                Image.fromarray(to_uint8_rgb(x, f"image {i}")) for i, x in enumerate(images)]
    batch = np.asarray(images)
    if batch.ndim not in (3, 4) or len(batch) == 0:
        raise DataError(f"images array has shape {batch.shape}; expected {EXPECTED}")
    return [Image.fromarray(to_uint8_rgb(x, f"image {i}")) for i, x in enumerate(batch)]


def stored_array_images(images: Any, root: Path | None = None) -> list[Path]:
    """PNG files of the images (`pil_images`) in root/<sha256 of their pixels>/ (default: the cache's `arrays`
    folder); written once, reused when the same pixels come again. Returns the paths in input order."""
    pils = pil_images(images)
    digest = hashlib.sha256()
    for p in pils:
        digest.update(np.asarray(p.size, dtype=np.int64).tobytes())
        digest.update(p.tobytes())
    folder = (root or cache_dir("arrays")) / f"arrays-{digest.hexdigest()[:24]}"  # the run's class name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.png" for i in range(len(pils))]
    for p, path in zip(pils, paths):
        if not path.is_file():
            with atomic_path(path) as tmp:
                p.save(tmp, format="PNG")
    return paths
