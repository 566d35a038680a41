"""A packed file as a container (the format is cmg_core.data.packed's docstring): opening one with checks, the pseudo
path ``<file>#<row>`` of its images, and the pixels behind a pseudo path.

It imports nothing else of cmg_core.data, so cmg_core.data.images can open pseudo paths while
cmg_core.data.packed (which builds datasets) stays above cmg_core.data.types.
"""
from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..utils import check_archive

PSEUDO_PATH_SEP = "#"


def open_packed(file: Path):
    """The packed file's open npz (members are read on access), after checking it is one and its archive is sane."""
    if not file.exists():
        raise DataError(f"packed dataset file {file} does not exist; expected a file written by `cmg data pack`")
    if not file.is_file():
        raise DataError(f"packed dataset {file} is not a file; expected a file written by `cmg data pack`")
    try:
        z = np.load(file, allow_pickle=False)  # reads the archive's directory only
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file} is not a packed dataset file (could not be read as .npz: {exc}); expected a "
                        "file written by `cmg data pack`") from exc
    check_archive(file)  # before any member is inflated
    return z


@functools.lru_cache(maxsize=2)
def _packed_images(file: str, mtime: float) -> np.ndarray:
    with open_packed(Path(file)) as z:
        if "images" not in z.files:
            raise DataError(f"packed dataset file {file} holds no images; the file is damaged, repack it")
        return z["images"]


def packed_image(pseudo: str | Path) -> "Image.Image":
    """The RGB image behind a pseudo path `<file>#<row>` of a packed dataset (the app shows runs trained from a
    packed file with it)."""
    from PIL import Image

    file, _, row = str(pseudo).rpartition(PSEUDO_PATH_SEP)
    if not row.isdigit() or not Path(file).is_file():
        raise DataError(f"image {pseudo} does not exist (not a file, nor <packed file>#<row> of an existing file)")
    images = _packed_images(file, Path(file).stat().st_mtime)
    if not 0 <= int(row) < len(images):
        raise DataError(f"image {pseudo}: row {row} is outside the packed file's {len(images)} images")
    return Image.fromarray(images[int(row)])


def pseudo_path(file: str | Path, row: int) -> Path:
    """The `path` of row `row` of a packed dataset: ``<file>#<row>`` (not a real file)."""
    return Path(f"{file}{PSEUDO_PATH_SEP}{row}")
