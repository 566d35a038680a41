"""Drawing and captioning of the embedded synthetic dataset (see `cmg_core.data.synthetic`).

One object of its class per image, in a corner or edge cell, on a redundant textured background with a few
distractors; captions describe only the object. Deterministic: numpy + PIL, seeded per image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "heart", "arrow"]
SYNONYMS = {
    "circle": ["circle", "disc", "round shape", "filled circle"],
    "square": ["square", "box", "square block", "four-sided tile"],
    "triangle": ["triangle", "three-sided shape", "triangular shape", "wedge"],
    "star": ["star", "five-pointed star", "pentagram", "star shape"],
    "cross": ["cross", "plus sign", "plus shape", "cross mark"],
    "ring": ["ring", "hoop", "donut shape", "annulus"],
    "hexagon": ["hexagon", "six-sided shape", "hexagonal tile", "honeycomb cell"],
    "crescent": ["crescent", "crescent moon", "moon shape", "sickle shape"],
    "heart": ["heart", "heart shape", "love heart", "valentine heart"],
    "arrow": ["arrow", "arrow sign", "pointer", "direction arrow"],
}
PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225), "yellow": (245, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 185), "white": (250, 250, 250), "black": (15, 15, 15),
    "pink": (250, 120, 190), "cyan": (30, 205, 225),
}
# anchor name -> (centre x, centre y) as fractions of the side; corners are drawn more often than edges
ANCHORS = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "top": (0.5, 0.24), "bottom": (0.5, 0.76), "left": (0.24, 0.5),
    "right": (0.76, 0.5),
}
ANCHOR_P = [0.15] * 4 + [0.1] * 4
WHERE = {
    "top left": ["in the top left", "in the upper left corner", "near the top-left corner", "at the upper left"],
    "top right": ["in the top right", "in the upper right corner", "near the top-right corner", "at the upper right"],
    "bottom left": ["in the bottom left", "in the lower left corner", "near the bottom-left corner", "at the lower left"],
    "bottom right": ["in the bottom right", "in the lower right corner", "near the bottom-right corner",
                     "at the lower right"],
    "top": ["at the top", "near the top edge", "in the upper middle", "at the top centre"],
    "bottom": ["at the bottom", "near the bottom edge", "in the lower middle", "at the bottom centre"],
    "left": ["on the left", "near the left edge", "at the left side", "in the middle of the left side"],
    "right": ["on the right", "near the right edge", "at the right side", "in the middle of the right side"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium-sized", "mid-sized", "moderate"],
              "large": ["large", "big", "sizeable"]}
TEMPLATES = [
    "{a_color} {syn} {where}",
    "{a_size} {color} {syn}",
    "there is {a_size} {color} {syn} {where} of the picture",
    "an image with one {color} {syn} {where}",
    "a picture showing {a_size} {color} {syn}",
    "{a_color} {syn} of {size} size, placed {where}",
    "the {syn} {where} is {color}",
    "a single {size_adj} {syn} coloured {color}",
    "{a_size} {syn} in {color} {where}",
    "just one {color} {syn}, {size_adj}, {where}",
]


def _article(phrase: str) -> str:
    """'a red' / 'an orange': the phrase with its indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _unit_polygon(kind: str, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygon shape in [-1, 1]^2, scaled to circumradius 1 and rotated by `angle`."""
    if kind in ("square", "triangle", "hexagon"):
        k = {"square": 4, "triangle": 3, "hexagon": 6}[kind]
        t = np.arange(k) * 2 * np.pi / k + np.pi / k - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif kind == "cross":
        a, b = 0.2, 1.0
        pts = np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                        (-b, a), (-b, -a), (-a, -a)])
    elif kind == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
        pts = pts - (pts.max(0) + pts.min(0)) / 2
    elif kind == "arrow":
        pts = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)])
    else:
        raise DataError(f"no polygon for shape {kind!r}")
    pts = pts / np.linalg.norm(pts, axis=1).max()
    c, s = np.cos(angle), np.sin(angle)
    return [(float(x * c - y * s), float(x * s + y * c)) for x, y in pts]


def _object_mask(kind: str, side: int, angle: float, ss: int = 4) -> np.ndarray:
    """(side, side) float alpha in [0, 1] of the shape, antialiased by drawing at `ss` x resolution."""
    n = side * ss
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    r = n / 2 - 0.5

    def disc(cx: float, cy: float, rad: float, fill: int) -> None:
        d.ellipse([n / 2 + cx * r - rad * r, n / 2 + cy * r - rad * r, n / 2 + cx * r + rad * r,
                   n / 2 + cy * r + rad * r], fill=fill)

    if kind == "circle":
        disc(0, 0, 1, 255)
    elif kind == "ring":
        disc(0, 0, 1, 255)
        disc(0, 0, 0.55, 0)
    elif kind == "crescent":
        disc(0, 0, 1, 255)
        disc(0.5 * np.cos(angle), 0.5 * np.sin(angle), 0.85, 0)
    else:
        d.polygon([(n / 2 + x * r, n / 2 + y * r) for x, y in _unit_polygon(kind, angle)], fill=255)
    return np.asarray(img.resize((side, side), Image.BOX), dtype=np.float32) / 255.0


def _sample_object(rng: np.random.Generator, kind: str, size: int) -> dict:
    """Random colour, scale (15-35% of the side), anchor cell and rotation of the object."""
    color = list(PALETTE)[rng.integers(len(PALETTE))]
    frac = rng.uniform(0.15, 0.35)
    side = max(8, int(round(frac * size)))
    anchor = list(ANCHORS)[rng.choice(len(ANCHORS), p=ANCHOR_P)]
    ax, ay = ANCHORS[anchor]
    jx, jy = (0.04, 0.05) if anchor in ("top", "bottom") else (0.05, 0.04) if anchor in ("left", "right") else (0.06, 0.06)
    cx, cy = (ax + rng.uniform(-jx, jx)) * size, (ay + rng.uniform(-jy, jy)) * size
    m = 2 + side // 12
    x0 = int(np.clip(round(cx - side / 2), m, size - side - m))
    y0 = int(np.clip(round(cy - side / 2), m, size - side - m))
    angle = rng.uniform(0, 2 * np.pi) if kind in ("arrow", "crescent") else rng.uniform(-0.3, 0.3)
    jitter = rng.integers(-12, 13, size=3)
    rgb = np.clip(np.array(PALETTE[color]) + jitter, 0, 255)
    size_word = "small" if frac < 0.21 else "medium" if frac < 0.28 else "large"
    return dict(kind=kind, color=color, rgb=rgb, side=side, x0=x0, y0=y0, angle=angle, anchor=anchor,
                size_word=size_word)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """(size, size, 3) float texture in [0, 255]: stripes, checker, smooth noise or gradient."""
    kind = ["stripes", "checker", "noise", "gradient"][rng.integers(4)]
    c1, c2 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    if kind == "stripes":
        period = rng.uniform(5, 20) * size / 128
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == "checker":
        cell = max(2, int(rng.uniform(5, 20) * size / 128))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    elif kind == "noise":
        k = int(rng.integers(4, 17))
        low = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        t = np.asarray(low, dtype=np.float32) / 255.0
    else:
        t = (xx * np.cos(theta) + yy * np.sin(theta)) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c1 + (c2 - c1) * t[..., None]
    bg += rng.normal(0, rng.uniform(3, 14), (size, size, 1))  # grain, same on all channels
    return bg, kind


def _draw_distractors(img: np.ndarray, rng: np.random.Generator, size: int, avoid: tuple[int, int, int, int]) -> None:
    """Paint 3-7 small dots, short lines and noise blobs, in place, outside the box `avoid`."""
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    s = size / 128
    x0, y0, x1, y1 = avoid
    pad = int(4 * s)
    blobs = []
    for _ in range(int(rng.integers(3, 8))):
        kind = int(rng.integers(3))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        px, py = (float(v) for v in rng.uniform(4 * s, size - 4 * s, 2))
        ang, length, rad = rng.uniform(0, np.pi), rng.uniform(6, 14) * s, rng.uniform(1, 2.5) * s
        m = pad + max(length / 2, 5 * s)
        if x0 - m <= px <= x1 + m and y0 - m <= py <= y1 + m:
            continue
        if kind == 0:
            d.ellipse([px - rad, py - rad, px + rad, py + rad], fill=col)
        elif kind == 1:
            dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
            d.line([px - dx, py - dy, px + dx, py + dy], fill=col, width=max(1, int(rad)))
        else:
            blobs.append((int(px), int(py), max(2, int(rng.uniform(3, 5) * s))))
    img[...] = np.asarray(canvas, dtype=np.float32)
    for bx, by, r in blobs:
        patch = img[max(0, by - r):by + r, max(0, bx - r):bx + r]
        patch[...] = rng.integers(0, 256, patch.shape)


def _draw_object(img: np.ndarray, obj: dict) -> tuple[int, int, int, int]:
    """Composite the outlined object into `img` in place; returns its tight pixel box (x0, y0, x1, y1)."""
    side, x0, y0 = obj["side"], obj["x0"], obj["y0"]
    ow = 1 + side // 24
    ya, xa = max(0, y0 - ow - 1), max(0, x0 - ow - 1)  # work on the box plus the outline margin only
    win = img[ya:y0 + side + ow + 1, xa:x0 + side + ow + 1]
    full = np.zeros(win.shape[:2], np.float32)
    full[y0 - ya:y0 - ya + side, x0 - xa:x0 - xa + side] = _object_mask(obj["kind"], side, obj["angle"])
    outline = np.asarray(Image.fromarray((full * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * ow + 1)),
                         dtype=np.float32)[..., None] / 255.0
    rgb = obj["rgb"].astype(np.float32)
    edge = np.array([0, 0, 0] if rgb @ [0.299, 0.587, 0.114] > 110 else [255, 255, 255], np.float32)
    win[...] = win * (1 - outline) + edge * outline
    win[...] = win * (1 - full[..., None]) + rgb * full[..., None]
    ys, xs = np.nonzero(outline[..., 0] > 0.02)
    return int(xs.min()) + xa, int(ys.min()) + ya, int(xs.max()) + 1 + xa, int(ys.max()) + 1 + ya


def render_image(seed: int, class_index: int, index: int, size: int, with_object: bool = True) -> tuple[np.ndarray, dict]:
    """Render image `index` of class CLASSES[class_index]: (size, size, 3) uint8 and its ground truth.

    The same random draws are made with or without the object, so `with_object=False` gives the exact
    background (with distractors) that the object was drawn on.
    """
    rng = np.random.default_rng([seed, class_index, index])
    obj = _sample_object(rng, CLASSES[class_index], size)
    img, background = _background(rng, size)
    ow = 2 + obj["side"] // 24
    _draw_distractors(img, rng, size, (obj["x0"] - ow, obj["y0"] - ow, obj["x0"] + obj["side"] + ow,
                                       obj["y0"] + obj["side"] + ow))
    box = _draw_object(img, obj) if with_object else None
    info = {k: obj[k] for k in ("color", "anchor", "size_word")} | {"box": box, "background": background}
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), info


def make_captions(seed: int, class_index: int, index: int, info: dict, n: int = 5) -> list[str]:
    """`n` different captions naming the colour, a class synonym, and often the size and position."""
    rng = np.random.default_rng([seed, class_index, index, 1])
    kind, color = CLASSES[class_index], info["color"]
    out = []
    for t in rng.choice(len(TEMPLATES), size=n, replace=False):
        syn = SYNONYMS[kind][rng.integers(len(SYNONYMS[kind]))]
        size_adj = SIZE_WORDS[info["size_word"]][rng.integers(3)]
        where = WHERE[info["anchor"]][rng.integers(4)]
        out.append(TEMPLATES[t].format(a_color=_article(color), color=color, syn=syn, a_size=_article(size_adj),
                                       size_adj=size_adj, size=info["size_word"], where=where))
    return out


def object_region_fraction(boxes, size: int, grid: int, of: str = "region") -> np.ndarray:
    """(N, grid*grid) overlap of each box (x0, y0, x1, y1; x1/y1 exclusive) with each grid region.

    Region m is row m // grid, column m % grid (row-major, row 0 at the top). With `of="region"` each
    value is the fraction of the region's area covered by the box; with `of="box"` it is the fraction of
    the box's area lying in the region (rows then sum to 1).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    edges = np.arange(grid + 1) * size / grid
    ox = np.clip(np.minimum(b[:, 2:3], edges[None, 1:]) - np.maximum(b[:, 0:1], edges[None, :-1]), 0, None)
    oy = np.clip(np.minimum(b[:, 3:4], edges[None, 1:]) - np.maximum(b[:, 1:2], edges[None, :-1]), 0, None)
    area = (oy[:, :, None] * ox[:, None, :]).reshape(len(b), grid * grid)
    if of == "region":
        return area / (size / grid) ** 2
    if of == "box":
        return area / np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-12)[:, None]
    raise DataError(f"object_region_fraction: of={of!r}; expected 'region' or 'box'")
