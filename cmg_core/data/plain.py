"""Plain image folders, no captions: what a user of a detector usually has.

    root/*.png                 one class, named after root (a folder of normal images)
    root/<class>/*.png         one class per sub-folder
    root/<split>/<class>/...   optionally below a split folder (train, validation / val, test)

Read by the `folder` loader when the folder has neither a captions file nor a metadata file, and by the Python
API for a list of image paths. Methods that read no text (`raw`, `ssd`, `she`) train on it; a method that needs
captions is refused by the run with the files it looked for (`CAPTION_FILES_HINT`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .imagefolder import class_and_split
from .images import IMAGE_EXTS
from .types import CaptionedDataset, CaptionedImage

CAPTION_FILES_HINT = "captions.csv or captions.jsonl (with Images/<class>/), or metadata.jsonl (imagefolder layout)"


def image_files(root: Path) -> list[Path]:
    """Every image file below `root` (by extension; hidden files and folders skipped), sorted."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    return sorted(out)


def plain_dataset(paths: Sequence[Path], root: Path, name: str = "folder") -> CaptionedDataset:
    """A caption-less CaptionedDataset of image `paths` below `root`, classes and splits from their folders."""
    items = []
    for path in paths:
        rel = Path(path).relative_to(root)
        class_name, split = class_and_split(rel, root)
        items.append(CaptionedImage(rel.with_suffix("").as_posix(), Path(os.path.abspath(path)), (), 0, class_name,
                                    split))
    class_names = sorted({it.class_name for it in items})
    ids = {c: i for i, c in enumerate(class_names)}
    items = sorted((CaptionedImage(it.image_id, it.path, (), ids[it.class_name], it.class_name, it.split)
                    for it in items), key=lambda it: (it.class_id, it.image_id))
    return CaptionedDataset(name=name, items=items, class_names=class_names, root=root,
                            meta={"layout": "plain", "captions_expected": CAPTION_FILES_HINT})


def load_plain_folder(root: Path) -> CaptionedDataset:
    """The plain layout of the module docstring; DataError when `root` holds no image file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected a folder of images ({', '.join(IMAGE_EXTS)})")
    paths = image_files(root)
    if not paths:
        raise DataError(f"no image files in {root}; expected images ({', '.join(IMAGE_EXTS)}) in it or in "
                        "<class>/ sub-folders, and for the methods that read text a " + CAPTION_FILES_HINT)
    return plain_dataset(paths, root)


def dataset_of_files(files: Sequence[str | Path]) -> CaptionedDataset:
    """A one-class caption-less dataset of image files given by path (the API's `fit([paths])`), named after the
    deepest folder holding all of them (their root)."""
    paths = list(dict.fromkeys(Path(os.path.abspath(f)) for f in files))
    if not paths:
        raise DataError("fit([]): expected at least one image path")
    bad = [str(p) for p in paths if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS]
    if bad:
        raise DataError(f"{len(bad)} path(s) are not image files ({', '.join(IMAGE_EXTS)}): {bad[:5]}")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    items = [CaptionedImage(p.relative_to(root).with_suffix("").as_posix(), p, (), 0, root.name) for p in sorted(paths)]
    return CaptionedDataset(name="folder", items=items, class_names=[root.name], root=root,
                            meta={"layout": "files", "captions_expected": CAPTION_FILES_HINT})
