"""Image decoding with clear errors (any mode or bit depth in, 8-bit RGB out)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .packfile import PSEUDO_PATH_SEP, packed_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MAX_PIXELS = 64_000_000  # refuse decompression bombs; 8000 x 8000
# the only decoders Pillow may use on uploads and dataset files (never EPS/PDF through Ghostscript, nor any other
# plug-in)
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK ...) to 8-bit RGB.

    Alpha is composited on white; 16-bit and float images are rescaled to their own range.
    """
    if img.width * img.height > MAX_PIXELS:
        raise DataError(f"{name}: {img.width}x{img.height} pixels is larger than the {MAX_PIXELS} pixels accepted")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def open_image(source, name: str | None = None) -> Image.Image:
    """Decode a path or binary file object into a fully loaded 8-bit RGB PIL image.

    Raises DataError naming the source when it is missing, empty, truncated or not an image.
    """
    label = name or str(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file() and PSEUDO_PATH_SEP in path.name:  # an image of a packed file: <file>#<row>
            return packed_image(path)
        if not path.is_file():
            raise DataError(f"image file {path} does not exist")
        if path.stat().st_size == 0:
            raise DataError(f"image file {path} is empty (0 bytes); expected an image")
    try:
        with Image.open(source, formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(
                    f"{label}: {img.width}x{img.height} pixels is larger than the {MAX_PIXELS} pixels accepted"
                )
            img.load()
            return to_rgb(img, label)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{label} could not be decoded as an image ({exc.__class__.__name__}: {exc})") from exc


def load_rgb(path: str | Path, size: int | None = None) -> Image.Image:
    """RGB image from disk, optionally resized to size x size (bicubic)."""
    img = open_image(path)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img
