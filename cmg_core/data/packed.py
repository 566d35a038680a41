"""One-file packed datasets: `cmg data pack` writes them, the `packed` loader reads them back.

A packed file is a compressed ``.npz`` (readable with ``numpy.load(path, allow_pickle=False)``) holding a
whole captioned dataset at ONE image size:

========================  ===============  =====================================================================
key                       dtype, shape     content
========================  ===============  =====================================================================
``meta_json``             str, ()          JSON: ``format`` ("cmg-packed"), ``format_version``, ``source``
                                           (dataset name, root, loader options), ``image_size``,
                                           ``text_model`` / ``embedding_dim`` (the first text model),
                                           ``text_models`` (every stored model), counts, ``source_meta``
``images``                uint8 (N,S,S,3)  pixels from ``load_rgb(path, size=S)``, bit-identical to the folder route
``labels``                int32 (N,)       class ids (index into the class names)
``class_names_*``         strings (K,)     class names
``image_ids_*``           strings (N,)     image ids
``splits_*``              strings (N,)     train / val / test
``captions_*``            strings (U,)     every DISTINCT caption string, in first-seen order
``caption_index``         int32 (N,C)      image i's j-th caption is ``captions[caption_index[i, j]]``; -1 pads
                                           images with fewer than C captions
``embeddings_<k>``        float32 (U,T)    caption embeddings of ``meta.text_models[k]`` (same row order as
                                           ``captions``)
``source_meta__<key>``    any numeric      numpy arrays of the source dataset's ``meta`` (e.g. synthetic
                                           ``object_boxes``)
========================  ===============  =====================================================================

Strings are stored without pickling as ``<name>_utf8`` (uint8, all strings UTF-8 encoded back to back) plus
``<name>_offsets`` (int64, length+1): string i is ``utf8[offsets[i]:offsets[i+1]]``.

A packed dataset has no image files. Its items' ``path`` is the pseudo path ``Path(f"{file}#{i}")`` (i = row),
which keeps image ids and paths unique but is no file: use ``dataset.image_array(rows, size)`` or
``dataset.load_image(i, size)`` for pixels and ``dataset.caption_embeddings_for(rows, model)`` for caption
embeddings (``data.images.open_image`` of a pseudo path reads its row, through cmg_core.data.packfile).
"""
from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..utils import atomic_path
from .packfile import open_packed, pseudo_path
from .types import CaptionedDataset, CaptionedImage

FORMAT = "cmg-packed"
FORMAT_VERSION = 1

Progress = Callable[[str, int, int], None]


# --- string arrays without pickle ------------------------------------------------------------------
def _encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    blobs = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def _decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _jsonable(value):
    """`value` as plain JSON data, or raise TypeError."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(type(value).__name__)


def _split_source_meta(meta: dict) -> tuple[dict, dict[str, np.ndarray], list[str]]:
    """Source `meta` -> (JSON part, numeric numpy arrays, names of entries that could not be stored)."""
    plain, arrays, dropped = {}, {}, []
    for key, value in meta.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[str(key)] = value
            continue
        try:
            plain[str(key)] = _jsonable(value)
            json.dumps(plain[str(key)])
        except (TypeError, ValueError):
            plain.pop(str(key), None)
            dropped.append(str(key))
    return plain, arrays, dropped


# --- writing ------------------------------------------------------------------------------------
def pack_dataset(
    dataset: CaptionedDataset,
    size: int,
    out: str | Path,
    text_models: Sequence[str] | None = None,
    source: dict | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    trunk_features: Sequence[dict] | None = None,
) -> dict:
    """Write `dataset` at `size` x `size` pixels into ONE packed file `out` (see the module doc for the format).

    `text_models`: caption embeddings to store (default: the project's default text model; ``[]`` stores
    none). `source`: ``{"name", "root", "options"}`` recorded in the metadata (defaults from `dataset`).
    `trunk_features`: frozen-trunk features to store with the file, each ``{"spec": dict, "orig": (N, F),
    "masked": (N, M, F)}`` (float16 on disk), so a run can use them where the trunk's weights are not installed
    (``cmg_core.features.trunk_feature_spec`` names what they were computed with).
    Returns the metadata written, plus ``path``, ``bytes`` and ``seconds``.
    The file is written atomically: an interrupted pack never leaves a half file at `out`.
    """
    from ..encoders.text import DEFAULT_TEXT_MODEL

    t0 = time.perf_counter()
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= int(size) <= 4096:
        raise DataError(f"pack size={size!r}: expected an integer image size in 8..4096 pixels")
    size = int(size)
    out = Path(out).expanduser()
    if out.is_dir():
        raise DataError(f"pack output {out} is a folder; expected a file path (e.g. {out / 'packed.npz'})")
    models = [DEFAULT_TEXT_MODEL] if text_models is None else list(dict.fromkeys(text_models))
    n = len(dataset)

    # images, in chunks so the progress bar moves
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    chunk = 64
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        images[rows] = dataset.image_array(rows, size)
        if progress:
            progress("pack images", int(rows[-1]) + 1, n)

    # captions: distinct strings + (N, C) index, -1 padded
    unique: dict[str, int] = {}
    c_max = max(len(it.captions) for it in dataset.items)
    index = np.full((n, c_max), -1, dtype=np.int32)
    for i, it in enumerate(dataset.items):
        for j, cap in enumerate(it.captions):
            index[i, j] = unique.setdefault(cap, len(unique))
    texts = list(unique)

    arrays: dict[str, np.ndarray] = {}
    model_info = []
    for k, name in enumerate(models):
        from ..encoders.text import TextEncoder

        if progress:
            progress(f"pack embeddings {name}", 0, len(texts))
        enc = TextEncoder(name, device=device)
        emb = np.ascontiguousarray(enc.encode(texts), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ConfigError(f"text model {name!r} returned embeddings of shape {emb.shape}; expected "
                              f"({len(texts)}, dim)")
        arrays[f"embeddings_{k}"] = emb
        model_info.append({"name": name, "dim": int(emb.shape[1]), "max_length": int(enc.max_length),
                           "key": f"embeddings_{k}"})
        if progress:
            progress(f"pack embeddings {name}", len(texts), len(texts))

    src = {"name": dataset.name, "root": str(dataset.root) if dataset.root is not None else None, "options": {}}
    src.update({k: v for k, v in (source or {}).items() if v is not None})
    if src["root"] is not None:
        src["root"] = str(Path(src["root"]).expanduser().resolve())
    try:
        src = _jsonable(src)
    except TypeError:
        src["options"] = {k: repr(v) for k, v in dict(src.get("options") or {}).items()}
        src = _jsonable(src)
    plain_meta, meta_arrays, dropped = _split_source_meta(dataset.meta or {})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_name": dataset.name,
        "source": src,
        "image_size": size,
        "num_images": n,
        "num_classes": dataset.num_classes,
        "num_captions": dataset.num_captions,
        "num_unique_captions": len(texts),
        "captions_per_image": c_max,
        "text_model": models[0] if models else None,
        "embedding_dim": model_info[0]["dim"] if model_info else None,
        "text_models": model_info,
        "source_meta": plain_meta,
        "source_meta_arrays": sorted(meta_arrays),
        "source_meta_dropped": dropped,
        "trunk_features": [{"spec": _jsonable(t["spec"]), "key": f"trunk_{k}"}
                           for k, t in enumerate(trunk_features or [])],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    for name, strings in (("class_names", dataset.class_names), ("image_ids", [it.image_id for it in dataset.items]),
                          ("splits", [it.split for it in dataset.items]), ("captions", texts)):
        arrays[f"{name}_utf8"], arrays[f"{name}_offsets"] = _encode_strings([str(s) for s in strings])
    arrays.update({f"source_meta__{k}": v for k, v in meta_arrays.items()})
    arrays["images"] = images
    arrays["labels"] = dataset.labels.astype(np.int32)
    arrays["caption_index"] = index
    for k, t in enumerate(trunk_features or []):
        orig, masked = np.asarray(t["orig"]), np.asarray(t["masked"])
        if orig.ndim != 2 or masked.ndim != 3 or len(orig) != n or len(masked) != n:
            raise DataError(f"trunk features must be (N, F) and (N, M, F) for the {n} images; got {orig.shape} "
                            f"and {masked.shape}")
        arrays[f"trunk_{k}_orig"], arrays[f"trunk_{k}_masked"] = orig.astype(np.float16), masked.astype(np.float16)
    arrays["meta_json"] = np.array(json.dumps(meta))

    if progress:
        progress("pack write", 0, 1)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a path without it
            np.savez_compressed(fh, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary data file, not mkstemp's private 0600
    if progress:
        progress("pack write", 1, 1)
    return {**meta, "path": str(out), "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0}


# --- reading ------------------------------------------------------------------------------------
_REQUIRED = ("images", "labels", "caption_index", "class_names_utf8", "class_names_offsets", "image_ids_utf8",
             "image_ids_offsets", "splits_utf8", "splits_offsets", "captions_utf8", "captions_offsets")


def read_packed_meta(file: str | Path) -> dict:
    """The metadata of a packed file (cheap: reads only ``meta_json``)."""
    with open_packed(Path(file)) as z:
        return _meta(z, Path(file))


def _meta(z, file: Path) -> dict:
    if not hasattr(z, "files") or "meta_json" not in z.files:
        raise DataError(f"{file} is not a packed dataset file (no meta_json entry); expected a file written by "
                        "`cmg data pack`")
    try:
        meta = json.loads(str(z["meta_json"]))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{file}: its meta_json is not valid JSON ({exc}); the packed file is damaged") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{file} is not a packed dataset file (format {found!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"packed dataset file {file} has format version {meta.get('format_version')!r}; this "
                        f"version of cmg reads version {FORMAT_VERSION}: repack it with `cmg data pack`")
    return meta


def load_packed(root: Path, **options) -> CaptionedDataset:
    """Registry loader ``packed``: `root` is the packed FILE. Returns the source dataset (same name, items order,
    class ids and names, captions, splits, image ids) with in-memory `images` and `caption_embeddings`."""
    if options:
        raise DataError(f"packed dataset: unknown option(s) {sorted(options)}; the packed loader takes none "
                        "(with a config written for the source dataset, also set data.options={})")
    file = Path(root).expanduser()
    with open_packed(file) as z:
        meta = _meta(z, file)
        missing = [k for k in _REQUIRED if k not in z.files]
        missing += [m["key"] for m in meta.get("text_models", []) if m.get("key") not in z.files]
        if missing:
            raise DataError(f"packed dataset file {file} lacks {missing}; the file is damaged, repack it")
        try:
            arrays = {k: z[k] for k in z.files if k != "meta_json"}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"packed dataset file {file} could not be read ({exc}); the file is damaged") from exc

    def strings(name: str) -> list[str]:
        return _decode_strings(arrays[f"{name}_utf8"], arrays[f"{name}_offsets"])

    class_names, image_ids, splits, texts = (strings(k) for k in ("class_names", "image_ids", "splits", "captions"))
    images, labels, index = arrays["images"], arrays["labels"].astype(np.int64), arrays["caption_index"]
    n, size = len(labels), int(meta["image_size"])
    if (images.shape != (n, size, size, 3) or images.dtype != np.uint8 or index.ndim != 2 or len(index) != n
            or len(image_ids) != n or len(splits) != n or (index >= len(texts)).any()):
        raise DataError(f"packed dataset file {file} is inconsistent (images {images.shape}, {n} labels, "
                        f"caption index {index.shape}, {len(texts)} captions); the file is damaged, repack it")
    items = []
    for i in range(n):
        row = index[i]
        caps = tuple(texts[j] for j in row[row >= 0])
        items.append(CaptionedImage(image_id=image_ids[i], path=pseudo_path(file, i), captions=caps,
                                    class_id=int(labels[i]), class_name=class_names[labels[i]]
                                    if 0 <= labels[i] < len(class_names) else "?", split=splits[i]))
    embeddings = {}
    for m in meta.get("text_models", []):
        table = arrays[m["key"]]
        if table.shape != (len(texts), int(m["dim"])):
            raise DataError(f"packed dataset file {file}: embeddings of {m['name']!r} have shape {table.shape}, "
                            f"expected ({len(texts)}, {m['dim']}); the file is damaged, repack it")
        embeddings[m["name"]] = (table.astype(np.float32, copy=False), index)
    ds_meta = dict(meta.get("source_meta") or {})
    ds_meta.update({k[len("source_meta__"):]: v for k, v in arrays.items() if k.startswith("source_meta__")})
    ds_meta["packed"] = {k: meta[k] for k in ("format_version", "source", "image_size", "text_model",
                                              "embedding_dim", "text_models", "created") if k in meta}
    ds_meta["packed"]["file"] = str(file)
    ds_meta["trunk_features"] = {json.dumps(t["spec"], sort_keys=True): (arrays[t["key"] + "_orig"],
                                                                      arrays[t["key"] + "_masked"])
                                 for t in meta.get("trunk_features", []) if t["key"] + "_orig" in arrays}
    return CaptionedDataset(name=meta.get("dataset_name") or meta["source"].get("name") or "packed", items=items,
                            class_names=class_names, root=file, meta=ds_meta, images=images,
                            caption_embeddings=embeddings)
