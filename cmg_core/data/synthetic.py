"""The embedded default dataset: one shape per image on a redundant textured background.

Every image holds ONE object of its class (circle, square, ...) drawn with a contrasting outline in
one corner or edge cell of the frame; the rest is background texture (stripes, checker, noise,
gradient) plus a few small distractors (dots, short lines, noise blobs) that are never class shapes.
Five captions per image describe only the object (colour, size, position, class synonym), so the
background is exactly the redundant content CMER is meant to mask away.

Drawing and captions live in `synthetic_render`. Generation is deterministic (numpy + PIL only), takes a few seconds, and is cached as PNG files plus a
``manifest.json`` written last; a folder is published by renaming a finished temporary sibling, so an
interrupted run never leaves a cache that looks valid.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils import atomic_path, cache_dir
from .synthetic_render import CLASSES, make_captions, object_region_fraction, render_image  # noqa: F401 (public names)
from .types import CaptionedDataset, CaptionedImage

GENERATOR = "cmg-synthetic"
GENERATOR_VERSION = 1
OPTIONS = ("root", "n_per_class", "size", "seed", "classes")


def _split_of(seed: int, class_index: int, n: int) -> list[str]:
    """Seeded per-class split: ~10% test, ~10% val (each at least 1 when n >= 3), rest train."""
    n_hold = max(1, int(round(0.1 * n))) if n >= 3 else 0
    order = np.random.default_rng([seed, class_index, 2**31]).permutation(n)
    split = ["train"] * n
    for i in order[:n_hold]:
        split[i] = "test"
    for i in order[n_hold:2 * n_hold]:
        split[i] = "val"
    return split


def _read_manifest(folder: Path, params: dict) -> dict | None:
    """The folder's manifest if it is complete and was made with `params`, else None."""
    try:
        man = json.loads((folder / "manifest.json").read_text())
        ok = (man.get("generator") == GENERATOR and man.get("generator_version") == GENERATOR_VERSION
              and man.get("params") == params
              and len(man["items"]) == params["classes"] * params["n_per_class"]
              and all((folder / it["file"]).is_file() for it in man["items"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return man if ok else None


def _generate(folder: Path, params: dict) -> None:
    """Render every image and write manifest.json (last) into `folder`."""
    seed, n, size = params["seed"], params["n_per_class"], params["size"]
    width = max(3, len(str(n - 1)))
    items = []
    for ci, name in enumerate(CLASSES[:params["classes"]]):
        (folder / name).mkdir(parents=True)
        splits = _split_of(seed, ci, n)
        for i in range(n):
            arr, info = render_image(seed, ci, i, size)
            stem = f"{name}_{i:0{width}d}"
            Image.fromarray(arr).save(folder / name / f"{stem}.png", compress_level=1)
            items.append({"image_id": f"{name}/{stem}", "file": f"{name}/{stem}.png", "class_id": ci,
                          "class_name": name, "split": splits[i], "captions": make_captions(seed, ci, i, info),
                          **info})
    man = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "params": params,
           "class_names": CLASSES[:params["classes"]], "items": items}
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps(man))


def _publish(tmp: Path, final: Path, params: dict) -> None:
    """Move the finished `tmp` folder to `final`, replacing an invalid or outdated one there."""
    if final.exists():
        if _read_manifest(final, params) is not None:  # a concurrent run finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(tmp, final)
    except OSError:
        if _read_manifest(final, params) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _check_root(root: Path) -> None:
    """Refuse to overwrite a user folder that holds something other than a synthetic cache."""
    if not root.is_dir() or not any(root.iterdir()):
        return
    try:
        ours = json.loads((root / "manifest.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise DataError(f"synthetic root {root} is a non-empty folder without a synthetic manifest.json; "
                        "give an empty or new folder (or none, to use the cache)")


def _validate(n_per_class: int, size: int, seed: int, classes: int | None, options: dict) -> int:
    """Check the parameters; returns the number of classes."""
    if options:
        raise DataError(f"synthetic dataset: unknown option(s) {sorted(options)}; expected {list(OPTIONS)}")
    classes = len(CLASSES) if classes is None else classes
    for name, value, lo, hi in (("classes", classes, 2, len(CLASSES)), ("n_per_class", n_per_class, 1, 100_000),
                                ("size", size, 32, 2048), ("seed", seed, 0, 2**63 - 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise DataError(f"synthetic dataset: {name}={value!r}; expected an integer in {lo}..{hi}")
    return int(classes)


def _clean_stale(parent: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Remove temporary siblings of `name` left behind by killed runs (older than `max_age_s`)."""
    for p in parent.glob(f".{name}.*"):
        try:
            if p.is_dir() and time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def load_synthetic(root: Path | None = None, n_per_class: int = 100, size: int = 128, seed: int = 0,
                   classes: int | None = None, **options) -> CaptionedDataset:
    """Generate (once, then cache) and load the synthetic shapes dataset.

    `root` is where the PNGs and manifest live; by default ``cache_dir("synthetic")/<key>`` with a key
    made of GENERATOR_VERSION and every parameter. `classes` takes the first that many of CLASSES.
    """
    k = _validate(n_per_class, size, seed, classes, options)
    params = {"classes": k, "n_per_class": int(n_per_class), "size": int(size), "seed": int(seed)}
    user_root = root is not None
    if root is None:
        root = cache_dir("synthetic") / f"v{GENERATOR_VERSION}_c{k}_n{n_per_class}_s{size}_seed{seed}"
    root = Path(root).expanduser()
    man = _read_manifest(root, params)
    if man is None:
        if user_root:  # a cache-key folder is ours by construction; a user folder may hold other data
            _check_root(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(root.parent, root.name)
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _generate(tmp, params)
            _publish(tmp, root, params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        man = _read_manifest(root, params)
        if man is None:
            raise DataError(f"synthetic dataset at {root} could not be generated (manifest missing after writing)")
    return _to_dataset(root, man)


def _to_dataset(root: Path, man: dict) -> CaptionedDataset:
    """Build the CaptionedDataset (with ground truth in `meta`) from a manifest."""
    items = [CaptionedImage(image_id=it["image_id"], path=root / it["file"], captions=tuple(it["captions"]),
                            class_id=it["class_id"], class_name=it["class_name"], split=it["split"])
             for it in man["items"]]
    meta = {
        "generator_version": man["generator_version"],
        "params": dict(man["params"]),
        "image_size": man["params"]["size"],
        "object_boxes": np.array([it["box"] for it in man["items"]], dtype=np.int64).reshape(-1, 4),
        "object_colors": [it["color"] for it in man["items"]],
        "object_positions": [it["anchor"] for it in man["items"]],
        "object_sizes": [it["size_word"] for it in man["items"]],
        "backgrounds": [it["background"] for it in man["items"]],
    }
    return CaptionedDataset(name="synthetic", items=items, class_names=list(man["class_names"]), root=root, meta=meta)
