"""Image helpers for display: masked variants and region overlays (the grid of cmg_core.regions, no torch), the
upload report PNG."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cmg_core.regions import grid_regions, masked_pictures


def masked_variants(arr: np.ndarray, n_regions: int, mode: str = "hard", soft_value: float = 0.1) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> the M masked variants (H, W, 3) uint8, region m hidden in variant m
    (`cmg_core.regions.masked_pictures`: the masks training uses)."""
    return list(masked_pictures(np.asarray(arr, dtype=np.uint8), n_regions, mode, soft_value))


def masked_image(arr: np.ndarray, region: int, n_regions: int, mode: str = "hard", soft_value: float = 0.1) -> np.ndarray:
    return masked_variants(arr, n_regions, mode, soft_value)[int(region)]


def region_box(height: int, width: int, region: int, n_regions: int) -> tuple[int, int, int, int]:
    return grid_regions(height, width, n_regions)[int(region)]


def overlay_region(img: Image.Image | np.ndarray, region: int, n_regions: int, color=(220, 30, 30),
                   alpha: float = 0.45, label: str | None = None) -> Image.Image:
    """The image with grid region `region` tinted and outlined (the masked region), plus grid lines."""
    base = Image.fromarray(np.asarray(img, dtype=np.uint8)) if isinstance(img, np.ndarray) else img.convert("RGB")
    w, h = base.size
    regions = grid_regions(h, w, n_regions)
    over = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    for (y0, y1, x0, x1) in regions:
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255, 140), width=1)
    y0, y1, x0, x1 = regions[int(region)]
    d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color + (int(255 * alpha),), outline=color + (255,),
                width=max(2, w // 64))
    if label:
        d.text((x0 + 3, y0 + 2), label, fill=(255, 255, 255, 255))
    return Image.alpha_composite(base.convert("RGBA"), over).convert("RGB")


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def report_png(name: str, original: Image.Image, overlay: Image.Image, masked: Image.Image,
               lines: Sequence[str], tile: int = 224) -> bytes:
    """One PNG summarising an upload: original | RID's mask overlaid | masked image, then text lines."""
    font = ImageFont.load_default()
    pad, line_h = 10, 16
    tiles = [im.convert("RGB").resize((tile, tile), Image.BICUBIC) for im in (original, overlay, masked)]
    titles = ["uploaded image", "RID's chosen region", "masked image (E2 input)"]
    text = [f"CMG analysis of {name}"] + list(lines)
    width = 3 * tile + 4 * pad
    height = pad + line_h + tile + pad + line_h * len(text) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (t, title) in enumerate(zip(tiles, titles)):
        x = pad + i * (tile + pad)
        d.text((x, pad), title, fill=(60, 60, 60), font=font)
        canvas.paste(t, (x, pad + line_h))
    y = pad + line_h + tile + pad
    for k, line in enumerate(text):
        d.text((pad, y + k * line_h), line, fill=(0, 0, 0) if k else (20, 20, 120), font=font)
    return to_png(canvas)
