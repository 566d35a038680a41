"""Processing of uploaded files for the Upload page (no Streamlit here, so it is testable on its own).

`process_uploads([(name, bytes), ...], predictor)` decodes every file with `cmg_core.data.images.open_image`
(0-byte, truncated, non-image and too-large files are rejected with a message; RGBA, grayscale and 16-bit
images are converted to RGB with a note) and runs `predictor.explain` on the good ones.  One bad file
never stops the others.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from cmg_core.errors import CMGError, DataError
from cmg_core.data.images import FORMATS, open_image

log = logging.getLogger("cmg.app")

MAX_BYTES = 50 * 1024 * 1024  # per uploaded file
MAX_FILES = 32  # scored per batch; the cache of a session holds at most this many results

MODE_NOTES = {
    "RGBA": "has an alpha channel (RGBA): transparency was composited on white and the image converted to RGB",
    "LA": "is grayscale with alpha: transparency was composited on white and the image converted to RGB",
    "PA": "is a palette image with alpha: transparency was composited on white and the image converted to RGB",
    "L": "is grayscale: converted to RGB (the gray value copied to the three channels)",
    "1": "is black-and-white (1-bit): converted to RGB",
    "I;16": "is 16-bit: rescaled to its own range and converted to 8-bit RGB",
    "I;16B": "is 16-bit: rescaled to its own range and converted to 8-bit RGB",
    "I;16L": "is 16-bit: rescaled to its own range and converted to 8-bit RGB",
    "I": "is 32-bit integer: rescaled to its own range and converted to 8-bit RGB",
    "F": "is floating point: rescaled to its own range and converted to 8-bit RGB",
    "CMYK": "is CMYK: converted to RGB",
    "P": "is a palette image: converted to RGB",
}


@dataclass
class UploadResult:
    name: str
    ok: bool
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    image: Image.Image | None = None
    result: dict[str, Any] | None = None
    digest: str = ""

    @property
    def methods(self) -> list[str]:
        return list((self.result or {}).get("scores", {}))


class SharedPredictor:
    """One run's Predictor, shared by every session of the app: scoring calls run one at a time under a lock,
    so sessions scoring at once never interleave inside the model (its modules, buffers and RNG)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.lock = threading.Lock()

    def explain(self, image):
        with self.lock:
            return self.predictor.explain(image)


class UploadCache:
    """A session's scored uploads, keyed by (run, file name, content digest): least recently used first out,
    at most `max_entries`, and `keep(keys)` drops what is no longer uploaded."""

    def __init__(self, max_entries: int = MAX_FILES):
        self.max_entries = int(max_entries)
        self.items: OrderedDict = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key, result: "UploadResult") -> None:
        self.items[key] = result
        self.items.move_to_end(key)
        while len(self.items) > self.max_entries:
            self.items.popitem(last=False)

    def keep(self, keys) -> None:
        keys = set(keys)
        for key in [k for k in self.items if k not in keys]:
            del self.items[key]


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def decode_upload(name: str, data: bytes) -> tuple[Image.Image | None, list[str], str | None]:
    """(RGB image or None, notes about conversions, error message or None) for one uploaded file."""
    if data is None or len(data) == 0:
        return None, [], f"{name} is empty (0 bytes); expected an image file (PNG, JPEG, TIFF, BMP, WebP)."
    if len(data) > MAX_BYTES:
        return None, [], f"{name} is {_mib(len(data))}, larger than the {_mib(MAX_BYTES)} accepted per file."
    notes: list[str] = []
    try:  # header only: which conversion will open_image do?
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            mode = probe.mode
            if mode == "P" and "transparency" in probe.info:
                mode = "PA"
            if mode in MODE_NOTES:
                notes.append(f"{name} {MODE_NOTES[mode]}.")
    except Exception:  # noqa: BLE001 - open_image below gives the real message
        pass
    try:
        img = open_image(io.BytesIO(data), name=name)
    except DataError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            msg = f"{name} is truncated or corrupt (the file ends before the image data does): {msg}"
        return None, [], msg
    return img, notes, None


def process_uploads(files: Iterable[tuple[str, bytes]], predictor, progress=None) -> list[UploadResult]:
    """Decode and explain each (name, bytes); every file gets an UploadResult (ok or with an error)."""
    files = list(files)
    out: list[UploadResult] = []
    for i, (name, data) in enumerate(files):
        out.append(process_one(name, data, predictor))
        if progress is not None:
            progress(i + 1, len(files), name)
    return out


def process_one(name: str, data: bytes, predictor) -> UploadResult:
    img, notes, error = decode_upload(name, data)
    res = UploadResult(name=name, ok=False, error=error, notes=notes, image=img, digest=digest(data or b""))
    if img is None:
        return res
    if predictor is None:
        res.error = "no predictor is loaded for this run"
        return res
    try:
        res.result = predictor.explain(img)
        res.ok = True
    except CMGError as exc:
        res.error = f"{name}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a failing image must not stop the batch
        log.exception("explain failed for %s", name)
        res.error = f"{name}: the model could not score this image ({type(exc).__name__}: {exc})"
    return res


def threshold_of(result: dict, method: str, train_scores: np.ndarray | None) -> float | None:
    thr = (result.get("thresholds") or {}).get(method)
    if thr is not None:
        return float(thr)
    if train_scores is not None and len(train_scores):
        return float(np.percentile(train_scores, 95))
    return None


def verdict(score: float, threshold: float | None) -> str:
    if threshold is None:
        return "no threshold"
    return "anomalous" if score > threshold else "normal"


def rid_of(res: dict) -> tuple[int, np.ndarray]:
    """(RID's chosen region, or -1 for a run without RID; its probabilities (M,), empty without RID)."""
    k, probs = res.get("rid_choice"), res.get("rid_probs")
    return (-1 if k is None else int(k)), (np.zeros(0) if probs is None else np.asarray(probs, dtype=float))


def results_table(results: Sequence[UploadResult]) -> pd.DataFrame:
    """One row per uploaded file: status, notes/errors, RID choice and probabilities, per-method score,
    percentile among the normal training images' out-of-fold scores, calibrated threshold and verdict."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"file": r.name, "status": "ok" if r.ok else "rejected",
                               "message": r.error or " ".join(r.notes)}
        if r.ok and r.result:
            res = r.result
            row["rid_choice"], probs = rid_of(res)
            for j, p in enumerate(probs):
                row[f"rid_prob_{j}"] = round(float(p), 6)
            for m, s in (res.get("scores") or {}).items():
                thr = threshold_of(res, m, None)
                row[f"score_{m}"] = float(s)
                row[f"percentile_{m}"] = float((res.get("percentiles") or {}).get(m, np.nan))
                row[f"threshold_{m}"] = thr
                row[f"verdict_{m}"] = verdict(float(s), thr)
        rows.append(row)
    return pd.DataFrame(rows)


def results_csv(results: Sequence[UploadResult]) -> bytes:
    return results_table(results).to_csv(index=False).encode()


def report_lines(r: UploadResult) -> list[str]:
    res = r.result or {}
    k, probs = rid_of(res)
    lines = [f"RID masks region {k} (probability {probs[k]:.2f})" if 0 <= k < len(probs) else
             "no masks (this run's methods do not use RID)"]
    for m, s in (res.get("scores") or {}).items():
        thr = threshold_of(res, m, None)
        pct = (res.get("percentiles") or {}).get(m)
        lines.append(f"{m}: score {float(s):.3f}" + (f", {float(pct):.1f}th percentile of normal images"
                                                      if pct is not None else "")
                     + (f", threshold {thr:.3f} -> {verdict(float(s), thr)}" if thr is not None else ""))
    lines += r.notes
    return lines


def n_regions_of(result: dict, default: int = 4) -> int:
    n = len(result.get("rid_probs", []) if result.get("rid_probs") is not None else [])
    return n or len(result.get("variants") or []) or default


def chosen_overlay(r: UploadResult, default_regions: int = 4) -> Image.Image:
    """The uploaded image with RID's chosen region tinted (grid regions scale with the image)."""
    from .imaging import overlay_region

    res = r.result or {}
    k = rid_of(res)[0]
    if k < 0:  # a run without RID: nothing is masked
        return r.image
    return overlay_region(r.image, k, n_regions_of(res, default_regions), label=f"RID {k}")


def report_png_bytes(r: UploadResult, default_regions: int = 4) -> bytes:
    from .imaging import report_png

    res = r.result or {}
    masked = res.get("masked_image") or r.image
    return report_png(r.name, r.image, chosen_overlay(r, default_regions), masked, report_lines(r))
