"""UCM-captions: the UC Merced Land Use images with the captions of Qu et al. (2016).

Layout (either the original 256 px .tif download or a resized .png/.jpg copy)::

    root/Images/<class>/<class>NN.{tif,png,jpg}      21 classes x 100 images, NN = 00..99
    root/dataset_ucm_captions.json                    Karpathy format

The caption file does not name the image files by class (`filename` is "{imgid+1}.tif"); the mapping is
positional: caption entry `imgid = i` belongs to `sorted(class_folders)[i // 100]/<class>{i % 100:02d}` and
its class label is `i // 100` (classes in alphabetical order).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import DataError
from .types import SPLITS, CaptionedDataset, CaptionedImage

CAPTIONS_FILE = "dataset_ucm_captions.json"
IMAGES_DIR = "Images"
IMAGES_PER_CLASS = 100
UCM_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
KNOWN_OPTIONS = ("splits",)

UCM_META = {
    "official_classes": 21,
    "official_images": 2100,
    "captions_per_image": 5,
    "official_splits": {"train": 1680, "val": 210, "test": 210},
    "source": "UC Merced Land Use (Yang & Newsam 2010) + UCM-captions (Qu et al. 2016)",
    "paper_protocol": "6 normal classes drawn at random, the other 15 are anomalies (AUROC, mean over tasks)",
}


def load_ucm_captions(root: Path, splits: str | list[str] | None = None, **options) -> CaptionedDataset:
    """Load UCM-captions from `root` (see the module docstring for the layout).

    `splits` optionally keeps only some of the JSON's splits ("train", "val", "test"; a list or a
    comma-separated string). Images are not decoded here, only checked to exist.
    """
    _warn_unknown(options)
    root = Path(root)
    entries = _read_entries(root / CAPTIONS_FILE)
    images_dir = root / IMAGES_DIR
    class_names = _class_folders(images_dir)
    _check_class_count(entries, class_names, root)
    keep = _parse_splits(splits)
    files = {name: _index_folder(images_dir / name) for name in class_names}
    items = [
        _make_item(entry, class_names, files, images_dir, root / CAPTIONS_FILE)
        for entry in entries
        if keep is None or _entry_split(entry, root / CAPTIONS_FILE) in keep
    ]
    if not items:
        raise DataError(f"{root / CAPTIONS_FILE}: no caption entries left after keeping splits {sorted(keep or [])}")
    items.sort(key=lambda it: (it.class_id, it.image_id))
    return CaptionedDataset(name="ucm_captions", items=items, class_names=class_names, root=root, meta=dict(UCM_META))


def _warn_unknown(options: dict) -> None:
    """Unknown options are ignored with a warning (so a typo does not pass silently)."""
    if options:
        warnings.warn(
            f"ucm_captions: ignoring unknown option(s) {sorted(options)}; accepted: {list(KNOWN_OPTIONS)}",
            stacklevel=3,
        )


def _read_entries(path: Path) -> list[dict]:
    """The `images` list of the Karpathy-format caption file, checked for the keys we use."""
    if not path.is_file():
        raise DataError(f"UCM-captions file {path} does not exist; expected the Karpathy-format {CAPTIONS_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); expected the Karpathy-format {CAPTIONS_FILE}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a JSON object with an 'images' list (Karpathy format)")
    entries = data["images"]
    if not entries:
        raise DataError(f"{path}: the 'images' list is empty")
    seen: set[int] = set()
    for pos, entry in enumerate(entries):
        _check_entry(entry, pos, path)
        if entry["imgid"] in seen:
            raise DataError(f"{path}: images[{pos}] repeats imgid {entry['imgid']}; expected each imgid once")
        seen.add(entry["imgid"])
    return entries


def _check_entry(entry, pos: int, path: Path) -> None:
    """One `images[pos]` entry must have an int `imgid` and a non-empty `sentences` list with `raw`."""
    where = f"{path}: images[{pos}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where} is {type(entry).__name__}; expected an object")
    imgid = entry.get("imgid")
    if not isinstance(imgid, int) or isinstance(imgid, bool) or imgid < 0:
        raise DataError(f"{where} has imgid={imgid!r}; expected a non-negative integer")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DataError(f"{where} (imgid {imgid}) has no 'sentences' list; expected sentences with 'raw' text")
    for s in sentences:
        if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
            raise DataError(f"{where} (imgid {imgid}): a sentence lacks a 'raw' string: {s!r:.80}")


def _class_folders(images_dir: Path) -> list[str]:
    """Sorted class folder names under Images/ (hidden folders ignored)."""
    if not images_dir.is_dir():
        raise DataError(f"UCM images folder {images_dir} does not exist; expected Images/<class>/<class>NN.tif|png")
    names = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{images_dir} contains no class folders; expected Images/<class>/<class>NN.tif|png")
    return names


def _check_class_count(entries: list[dict], class_names: list[str], root: Path) -> None:
    """The positional mapping needs exactly max(imgid) // 100 + 1 class folders."""
    needed = max(e["imgid"] for e in entries) // IMAGES_PER_CLASS + 1
    if needed != len(class_names):
        raise DataError(
            f"{root}: {CAPTIONS_FILE} has imgids up to {max(e['imgid'] for e in entries)}, i.e. {needed} classes of "
            f"{IMAGES_PER_CLASS} images, but {root / IMAGES_DIR} has {len(class_names)} class folders; "
            "expected the same number (imgid // 100 is the index of the class folder in sorted order)"
        )


def _parse_splits(splits: str | list[str] | None) -> set[str] | None:
    """None (keep all) or a validated set of split names."""
    if splits is None:
        return None
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else [str(s) for s in splits]
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise DataError(f"ucm_captions: splits={splits!r}; expected a subset of {list(SPLITS)}")
    return set(names)


def _entry_split(entry: dict, path: Path) -> str:
    """The entry's split label ("train" when absent); anything else is an error."""
    split = entry.get("split", "train")
    if split == "restval":  # Karpathy files sometimes use this for extra training images
        return "train"
    if split not in SPLITS:
        raise DataError(f"{path}: imgid {entry['imgid']} has split={split!r}; expected one of {list(SPLITS)}")
    return split


def _index_folder(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for the image files of one class folder (one listing per folder)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in UCM_EXTS:
            found.setdefault(p.stem, p)
    return found


def _make_item(
    entry: dict, class_names: list[str], files: dict[str, dict[str, Path]], images_dir: Path, json_path: Path
) -> CaptionedImage:
    """Caption entry -> CaptionedImage through the positional imgid mapping."""
    imgid = entry["imgid"]
    class_id, number = divmod(imgid, IMAGES_PER_CLASS)
    name = class_names[class_id]
    stem = f"{name}{number:02d}"
    path = files[name].get(stem)
    if path is None:
        raise DataError(
            f"{json_path}: imgid {imgid} maps to image {images_dir / name / stem}.(tif|png|jpg), which does not exist"
        )
    captions = tuple(c for c in (s["raw"].strip() for s in entry["sentences"]) if c)
    if not captions:
        raise DataError(f"{json_path}: imgid {imgid} ({name}/{stem}) has only empty captions")
    return CaptionedImage(
        image_id=f"{name}/{stem}",
        path=path,
        captions=captions,
        class_id=class_id,
        class_name=name,
        split=_entry_split(entry, json_path),
    )
