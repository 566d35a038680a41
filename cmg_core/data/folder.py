"""A user's own captioned images: `root/Images/<class>/*` plus a captions file (or the Hugging Face
imagefolder layout: `root/metadata.jsonl` with file_name + caption; see `cmg_core.data.imagefolder`).

Captions file (the `captions` option, else `root/captions.csv`, else `root/captions.jsonl`):

* CSV with a header: `image`, `caption`, optional `class`, optional `split` (train/val/test).
* JSONL: one object per line with the same keys.

`image` is a path relative to `root` or to `root/Images` (absolute paths are accepted too). Several rows
for one image give it several captions. The class is the `class` value when given, else the image's folder
name under `Images/`; class ids follow the sorted class names. Images are only checked to exist here; they
are decoded when used.

Without a captions file or metadata file the folder is read as plain images (`cmg_core.data.plain`: `root/*` or
`root/<class>/*`, or the same under `Images/`): no captions, so only methods that read no text train on it.
The `files` option (a list of image paths, relative to `root` or absolute) makes a one-class caption-less dataset
of exactly those files (the API's `fit([paths])`).
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .imagefolder import find_metadata, jsonl_objects, load_imagefolder
from .images import IMAGE_EXTS
from .plain import dataset_of_files, load_plain_folder
from .types import SPLITS, CaptionedDataset, CaptionedImage

IMAGES_DIR = "Images"
DEFAULT_CAPTION_FILES = ("captions.csv", "captions.jsonl")
REQUIRED_COLUMNS = ("image", "caption")
MAX_EXAMPLES = 5


@dataclass
class _Entry:
    """Everything the captions file says about one image."""

    path: Path
    captions: list[str] = field(default_factory=list)
    class_name: str | None = None
    split: str | None = None


def load_folder(
    root: Path, captions: str | Path | None = None, require_captions: bool = True,
    caption_column: str | None = None, files: list | None = None, **options
) -> CaptionedDataset:
    """Load `root/Images/<class>/*` with the captions of a CSV or JSONL file (see the module docstring), or -
    when there is no Images/ folder but a metadata.jsonl / metadata.csv - the Hugging Face imagefolder layout
    (`cmg_core.data.imagefolder`; `caption_column` names its caption column).

    With `require_captions=True` (default) an image under Images/ that no caption row names is an error;
    with False such images are dropped with a warning.
    """
    if options:
        warnings.warn(f"folder: ignoring unknown option(s) {sorted(options)}", stacklevel=2)
    root = Path(root)
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir() and find_metadata(root) is not None:
        return load_imagefolder(root, caption_column)
    if files is not None:
        return dataset_of_files([Path(f) if Path(f).is_absolute() else root / f for f in files])
    if captions is None and not any((root / name).is_file() for name in DEFAULT_CAPTION_FILES):
        return load_plain_folder(images_dir if images_dir.is_dir() else root)  # no text: plain images
    if not images_dir.is_dir():
        raise DataError(f"images folder {images_dir} does not exist; expected {root}/Images/<class>/<image files> "
                        f"and a captions file, or the imagefolder layout ({root}/metadata.jsonl with file_name "
                        "and caption columns)")
    cap_path = _find_captions_file(root, captions)
    entries: dict[Path, _Entry] = {}
    for line_no, row in _read_rows(cap_path):
        _add_row(entries, row, line_no, cap_path, root)
    if not entries:
        raise DataError(f"captions file {cap_path} has no caption rows; expected columns {list(REQUIRED_COLUMNS)}")
    _check_uncaptioned(images_dir, entries, require_captions, cap_path)
    items = _build_items(entries, images_dir, root, cap_path)
    class_names = sorted({it.class_name for it in items})
    ids = {name: i for i, name in enumerate(class_names)}
    items = [_with_class_id(it, ids[it.class_name]) for it in items]
    items.sort(key=lambda it: (it.class_id, it.image_id))
    meta = {"captions_file": str(cap_path)}
    return CaptionedDataset(name="folder", items=items, class_names=class_names, root=root, meta=meta)


def _find_captions_file(root: Path, captions: str | Path | None) -> Path:
    """The explicit `captions` path (absolute or relative to root), else the first default file present."""
    if captions is not None:
        path = Path(captions).expanduser()
        if not path.is_absolute() and not path.exists():
            path = root / path
        if not path.is_file():
            raise DataError(f"captions file {path} does not exist; expected a .csv or .jsonl file")
        return path
    for name in DEFAULT_CAPTION_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"no captions file in {root}: expected {root / 'captions.csv'} or {root / 'captions.jsonl'} "
        "(or pass captions=PATH)"
    )


def _read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for every caption row of a CSV or JSONL file."""
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        yield from _read_jsonl(path)
    else:
        yield from _read_csv(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"captions file {path} is not UTF-8 text ({exc})") from exc


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a CSV captions file with a header naming at least `image` and `caption`."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise DataError(f"{path}:1: malformed CSV header ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: header {header} lacks column(s) {missing}; expected columns image, caption[, class, split]"
        )
    reader.fieldnames = header
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more fields than header columns {header}")
            yield reader.line_num, row
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Objects of a JSONL captions file (blank lines skipped)."""
    for line_no, obj in jsonl_objects(_read_text(path), path, "image, caption"):
        missing = [c for c in REQUIRED_COLUMNS if c not in obj]
        if missing:
            raise DataError(f"{path}:{line_no}: missing key(s) {missing}; expected image, caption[, class, split]")
        yield line_no, obj


def _text(row: dict, key: str, where: str) -> str | None:
    """A stripped string value (None when absent or blank); non-strings are an error."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {value!r}; expected a string")
    return value.strip() or None


def _add_row(entries: dict[Path, _Entry], row: dict, line_no: int, cap_path: Path, root: Path) -> None:
    """Validate one caption row and merge it into `entries` (keyed by resolved image path)."""
    where = f"{cap_path}:{line_no}"
    image = _text(row, "image", where)
    caption = _text(row, "caption", where)
    if image is None:
        raise DataError(f"{where}: empty 'image'; expected a path relative to {root} or {root / IMAGES_DIR}")
    if caption is None:
        raise DataError(f"{where}: empty caption for image {image!r}")
    path = _resolve_image(image, root, where)
    entry = entries.setdefault(path, _Entry(path=path))
    entry.captions.append(caption)
    entry.class_name = _merge(entry.class_name, _text(row, "class", where), "class", image, where)
    split = _text(row, "split", where)
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} for image {image!r}; expected one of {list(SPLITS)}")
    entry.split = _merge(entry.split, split, "split", image, where)


def _merge(old: str | None, new: str | None, key: str, image: str, where: str) -> str | None:
    """Rows for the same image must agree on class/split."""
    if old is not None and new is not None and old != new:
        raise DataError(f"{where}: image {image!r} has {key} {new!r} here but {old!r} on an earlier row")
    return old if new is None else new


def _resolve_image(image: str, root: Path, where: str) -> Path:
    """An existing image file: `image` relative to root, relative to root/Images, or absolute."""
    given = Path(image)
    candidates = [given] if given.is_absolute() else [root / given, root / IMAGES_DIR / given]
    for cand in candidates:
        try:
            found = cand.is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise DataError(f"{where}: image {image[:80]!r}{'...' if len(image) > 80 else ''} is not a usable file "
                            f"name ({exc.strerror or exc})") from exc
        if found:
            if cand.suffix.lower() not in IMAGE_EXTS:
                raise DataError(f"{where}: {cand} is not an image file; expected one of {list(IMAGE_EXTS)}")
            return _abs(cand)
    tried = " or ".join(str(c) for c in candidates)
    raise DataError(f"{where}: image {image!r} does not exist (looked for {tried})")


def _abs(path: Path) -> Path:
    """Absolute, normalised path without resolving symlinks (linked images keep their class folder)."""
    return Path(os.path.abspath(path))


def _images_on_disk(images_dir: Path) -> list[Path]:
    """Every image file under Images/<class>/ (by extension, hidden files skipped)."""
    return sorted(
        _abs(p)
        for p in images_dir.glob("*/**/*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )


def _check_uncaptioned(images_dir: Path, entries: dict[Path, _Entry], require: bool, cap_path: Path) -> None:
    """Images under Images/ that no caption row names: an error, or a warning when not required."""
    missing = [p for p in _images_on_disk(images_dir) if p not in entries]
    if not missing:
        return
    examples = ", ".join(str(p.relative_to(_abs(images_dir))) for p in missing[:MAX_EXAMPLES])
    msg = f"{len(missing)} image(s) under {images_dir} have no caption in {cap_path} (e.g. {examples})"
    if require:
        raise DataError(f"{msg}; expected a caption row for every image, or pass require_captions=False")
    warnings.warn(f"{msg}; they are left out", stacklevel=3)


def _build_items(entries: dict[Path, _Entry], images_dir: Path, root: Path, cap_path: Path) -> list[CaptionedImage]:
    """CaptionedImages with a placeholder class id (set once every class name is known)."""
    images_dir, root = _abs(images_dir), _abs(root)
    items = []
    for path, entry in entries.items():
        image_id, folder_class = _identify(path, images_dir, root)
        class_name = entry.class_name or folder_class
        if class_name is None:
            raise DataError(
                f"{cap_path}: image {path} has no 'class' value and is not under {images_dir}/<class>/; "
                "expected a class column or the Images/<class>/ layout"
            )
        items.append(
            CaptionedImage(
                image_id=image_id,
                path=path,
                captions=tuple(entry.captions),
                class_id=0,
                class_name=class_name,
                split=entry.split or "train",
            )
        )
    return items


def _identify(path: Path, images_dir: Path, root: Path) -> tuple[str, str | None]:
    """(image id, class from the folder layout or None) for a resolved image path."""
    if path.is_relative_to(images_dir):
        rel = path.relative_to(images_dir)
        folder_class = rel.parts[0] if len(rel.parts) > 1 else None
        return rel.with_suffix("").as_posix(), folder_class
    if path.is_relative_to(root):
        return path.relative_to(root).with_suffix("").as_posix(), None
    return path.with_suffix("").as_posix(), None


def _with_class_id(item: CaptionedImage, class_id: int) -> CaptionedImage:
    return CaptionedImage(
        image_id=item.image_id,
        path=item.path,
        captions=item.captions,
        class_id=class_id,
        class_name=item.class_name,
        split=item.split,
    )
