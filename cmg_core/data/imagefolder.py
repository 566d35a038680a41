"""The Hugging Face `imagefolder` layout, read by the `folder` loader when `root` has no `Images/` folder.

    root/metadata.jsonl (or metadata.csv)    one row per image: file_name, a caption column, optional label
    root/<file_name>                         images; file_name may hold folders, e.g. train/dog/1.png

The caption column is the `caption_column` option, else the first of `caption`, `text`, `captions`; its value
is a string or (JSONL) a list of strings (several captions). The class is the `label` / `class` column when
present, else the folder the image lies in below an optional split folder (`train`, `validation`/`val`,
`test`), else one class named after `root` - a folder of normal images only is a one-class dataset. The split
folder (or a `split` column) sets the image's split.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_EXTS
from .types import CaptionedDataset, CaptionedImage

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("caption", "text", "captions")
SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def find_metadata(root: Path) -> Path | None:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    return None


def _rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [(reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}) for row in reader]
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    return list(jsonl_objects(text, path, "file_name"))


def jsonl_objects(text: str, path: Path, expected: str):
    """(line number, object) of every non-blank line of a JSONL file; `expected` names the keys in errors."""
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); expected one object per line") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: got {type(obj).__name__}; expected an object with {expected}")
            yield n, obj


def class_and_split(rel: Path, root: Path) -> tuple[str, str]:
    """(class, split) of an image at `rel` below `root`: the split folder (train / validation / val / test) it lies
    in, if any, else "train"; the class is the next folder, else `root`'s own name (a folder of one class)."""
    parts = list(rel.parts[:-1])
    split = SPLIT_FOLDERS.get(parts[0].lower()) if parts else None
    if split:
        parts = parts[1:]
    return (parts[0] if parts else Path(root).resolve().name), split or "train"


def _captions(value, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    caps = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    if not caps:
        raise DataError(f"{where}: empty caption {value!r}; expected a string or a list of strings")
    return caps


def load_imagefolder(root: Path, caption_column: str | None = None) -> CaptionedDataset:
    """A CaptionedDataset from the imagefolder layout (see the module docstring)."""
    root = Path(root)
    meta_path = find_metadata(root)
    if meta_path is None:
        raise DataError(f"no {' or '.join(METADATA_FILES)} in {root}")
    rows = _rows(meta_path)
    if not rows:
        raise DataError(f"{meta_path} has no rows; expected one row per image with file_name and a caption")
    keys = set().union(*(r.keys() for _, r in rows))
    if "file_name" not in keys:
        raise DataError(f"{meta_path}: no file_name column (found {sorted(keys)})")
    col = caption_column or next((c for c in CAPTION_COLUMNS if c in keys), None)
    if col is None or col not in keys:
        raise DataError(f"{meta_path}: no caption column ({caption_column or ' / '.join(CAPTION_COLUMNS)}) among "
                        f"{sorted(keys)}; pass the option caption_column=NAME")
    items = []
    for n, row in rows:
        where = f"{meta_path}:{n}"
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: empty file_name")
        rel = Path(name.strip())
        path = root / rel
        try:
            exists = path.is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise DataError(f"{where}: file_name {name[:80]!r} is not a usable file name ({exc.strerror or exc})") from exc
        if not exists:
            raise DataError(f"{where}: image {path} does not exist")
        if path.suffix.lower() not in IMAGE_EXTS:
            raise DataError(f"{where}: {path} is not an image file; expected one of {list(IMAGE_EXTS)}")
        folder_class, split = class_and_split(rel, root)
        split = SPLIT_FOLDERS.get(str(row.get("split", "")).lower(), split)
        label = row.get("label", row.get("class"))
        class_name = str(label) if label not in (None, "") else folder_class
        items.append(CaptionedImage(image_id=rel.with_suffix("").as_posix(), path=path.absolute(),
                                    captions=tuple(_captions(row.get(col), where)), class_id=0,
                                    class_name=class_name, split=split))
    class_names = sorted({it.class_name for it in items})
    ids = {c: i for i, c in enumerate(class_names)}
    items = sorted((CaptionedImage(it.image_id, it.path, it.captions, ids[it.class_name], it.class_name, it.split)
                    for it in items), key=lambda it: (it.class_id, it.image_id))
    return CaptionedDataset(name="folder", items=items, class_names=class_names, root=root,
                            meta={"captions_file": str(meta_path), "layout": "imagefolder"})
