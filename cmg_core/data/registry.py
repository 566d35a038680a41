"""Name -> loader. Each loader is `load(root: Path | None, **options) -> CaptionedDataset`.

`root` is a folder, except for the loaders in FILE_ROOTS (`packed`), whose root is one file.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import DataError
from .types import CaptionedDataset

# name: (module, function, one-line description, needs a root)
DATASETS: dict[str, tuple[str, str, str, bool]] = {
    "synthetic": ("synthetic", "load_synthetic", "embedded demo: shapes on textured backgrounds, generated locally", False),
    "ucm_captions": ("ucm", "load_ucm_captions", "UC Merced Land Use + UCM-captions (21 classes, 5 captions each)", True),
    "folder": ("folder", "load_folder", "your own data: Images/<class>/* + captions.csv or captions.jsonl", True),
    "wikipedia": ("wikipedia", "load_wikipedia", "Wikipedia image-text dataset (Rasiwasia et al. 2010), 10 categories", True),
    "class_coco": ("coco", "load_class_coco", "COCO captions, single-object images grouped by category", True),
    "packed": ("packed", "load_packed", "one file written by `cmg data pack` (--root is that FILE)", True),
}

# loaders whose root is a single file rather than a folder
FILE_ROOTS = frozenset({"packed"})


def dataset_names() -> list[str]:
    return list(DATASETS)


def load_data(data) -> CaptionedDataset:
    """The dataset of a `data` config section (cmg_core.config.DataConfig)."""
    return load_dataset(data.name, data.root, allow_outside_root=data.allow_outside_root, **data.options)


def load_dataset(name: str, root: str | Path | None = None, allow_outside_root: bool = False,
                 **options) -> CaptionedDataset:
    """Load a dataset by registry name. `root` is required for everything but `synthetic`; for `packed` it is
    the packed file. Every image must lie inside `root` (links followed) unless `allow_outside_root`: a captions
    file or list naming /etc/... or ../.. is refused before any image is read."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {dataset_names()}")
    module, func, _, needs_root = DATASETS[name]
    if needs_root:
        if root is None:
            what = "file" if name in FILE_ROOTS else "folder"
            raise DataError(f"dataset {name!r} needs a root {what} (--root PATH)")
        root = Path(root).expanduser()
        if name in FILE_ROOTS:
            if not root.is_file():
                what = "is a folder" if root.is_dir() else "does not exist"
                raise DataError(f"dataset file {root} {what}; dataset {name!r} expects --root to be a file "
                                "written by `cmg data pack`")
        elif not root.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder (dataset {name!r})")
    loader = getattr(importlib.import_module(f"cmg_core.data.{module}"), func)
    ds = loader(Path(root) if root is not None else None, **options)
    if root is not None and not allow_outside_root and name not in FILE_ROOTS:
        check_contained(ds.paths, root, f"dataset {name!r}")
    return ds


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path` lies inside folder `root` once links and '..' are resolved."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def check_contained(paths, root: str | Path, what: str) -> None:
    """DataError naming the first of `paths` that lies outside `root` (links and '..' resolved)."""
    for p in paths:
        if not inside(p, root):
            raise DataError(f"{what}: image {p} lies outside the dataset root {root} (resolved: "
                            f"{os.path.realpath(p)}); refusing to read it - set data.allow_outside_root: true "
                            "if the files are yours")
