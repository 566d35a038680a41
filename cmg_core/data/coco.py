"""Class-COCO: COCO images that show a single object category, with their COCO captions.

Layout::

    root/annotations/captions_<split>.json
    root/annotations/instances_<split>.json
    root/<split>/<file_name>

An image is kept when all of its non-crowd instance annotations belong to one category. Class ids 0..79
are COCO's 80 categories sorted by category id (the CMDA convention), so `class_names` always lists every
category and ids stay comparable across subsets. `groups="cmda"` keeps only the 6 normal + 50 anomaly
categories of the CMDA protocol.
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError, DataError
from .types import CaptionedDataset, CaptionedImage

ANNOTATIONS_DIR = "annotations"
MAX_EXAMPLES = 5

# CMDA convention, class ids in the 0..79 numbering (COCO categories sorted by category id).
CMDA_NORMAL_GROUPS = (6, 14, 22, 74, 4, 23)
CMDA_ANOMALY_GROUPS = (
    67, 69, 33, 72, 49, 2, 55, 28, 76, 54, 24, 35, 78, 26, 42, 73, 32, 38, 64, 34, 70, 44, 57, 40, 30,
    31, 41, 45, 29, 60, 56, 43, 58, 36, 39, 66, 63, 37, 27, 62, 51, 79, 65, 68, 47, 1, 12, 25, 52, 48,
)  # fmt: skip


def load_class_coco(
    root: Path,
    split: str = "train2017",
    groups: str | None = None,
    max_per_class: int | None = None,
    **options,
) -> CaptionedDataset:
    """Load the single-object images of one COCO split with all their captions.

    `groups`: None/"all" (every category), "cmda" (the CMDA protocol's 56 categories) or a comma-separated
    list of class ids (0..79) or category names. `max_per_class` keeps the first N images of each class
    (by COCO image id).
    """
    if options:
        warnings.warn(f"class_coco: ignoring unknown option(s) {sorted(options)}", stacklevel=2)
    if max_per_class is not None and int(max_per_class) < 1:
        raise ConfigError(f"class_coco: max_per_class={max_per_class}; expected a positive integer or None")
    root = Path(root)
    ann_dir = root / ANNOTATIONS_DIR
    instances = _read_json(ann_dir / f"instances_{split}.json", ("images", "annotations", "categories"))
    captions = _read_json(ann_dir / f"captions_{split}.json", ("images", "annotations"))
    cat_ids, class_names = _categories(instances, ann_dir / f"instances_{split}.json")
    keep = _group_ids(groups, class_names)
    single = _single_category_images(instances, cat_ids, ann_dir / f"instances_{split}.json")
    texts = _captions_by_image(captions, ann_dir / f"captions_{split}.json")
    files = _file_names(instances, ann_dir / f"instances_{split}.json")
    chosen = _choose(single, texts, keep, max_per_class)
    if not chosen:
        raise DataError(
            f"{ann_dir}: no single-object image with captions in split {split!r} for groups={groups!r}; "
            "expected at least one"
        )
    items = _make_items(chosen, files, texts, class_names, root / split, _split_label(split))
    meta = {
        "split": split,
        "groups": groups,
        "coco_category_ids": cat_ids,
        "cmda_normal_groups": list(CMDA_NORMAL_GROUPS),
        "cmda_anomaly_groups": list(CMDA_ANOMALY_GROUPS),
    }
    return CaptionedDataset(name="class_coco", items=items, class_names=class_names, root=root, meta=meta)


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A COCO annotation file, checked to be a JSON object with list values under `keys`."""
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} does not exist; expected root/annotations/{path.name}")
    try:
        with path.open("rb") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); expected a COCO annotation file") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with keys {list(keys)}")
    missing = [k for k in keys if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path}: missing or non-list key(s) {missing}; expected a COCO file with {list(keys)}")
    return data


def _categories(instances: dict, path: Path) -> tuple[list[int], list[str]]:
    """(COCO category ids, names), both sorted by category id: position = class id."""
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in instances["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: a category lacks an integer 'id' or a 'name' ({exc})") from exc
    if not cats:
        raise DataError(f"{path}: 'categories' is empty; expected COCO's 80 categories")
    if len({c for c, _ in cats}) != len(cats):
        raise DataError(f"{path}: repeated category id; expected distinct ids")
    return [c for c, _ in cats], [n for _, n in cats]


def _group_ids(groups: str | None, class_names: list[str]) -> set[int] | None:
    """Class ids to keep: None = all."""
    if groups is None or str(groups).strip().lower() in ("", "all"):
        return None
    if str(groups).strip().lower() == "cmda":
        wanted = set(CMDA_NORMAL_GROUPS) | set(CMDA_ANOMALY_GROUPS)
        if max(wanted) >= len(class_names):
            raise DataError(
                f"groups='cmda' needs COCO's 80 categories (class ids up to {max(wanted)}), "
                f"but the annotation file has {len(class_names)}"
            )
        return wanted
    ids = set()
    for token in (t.strip() for t in str(groups).split(",")):
        if token.isdigit() and int(token) < len(class_names):
            ids.add(int(token))
        elif token in class_names:
            ids.add(class_names.index(token))
        else:
            raise ConfigError(
                f"class_coco: groups={groups!r} has {token!r}; expected 'all', 'cmda' or comma-separated "
                f"class ids 0..{len(class_names) - 1} / category names"
            )
    return ids


def _single_category_images(instances: dict, cat_ids: list[int], path: Path) -> dict[int, int]:
    """COCO image id -> class id for images whose non-crowd annotations all share one category."""
    index = {c: i for i, c in enumerate(cat_ids)}
    seen: dict[int, set[int]] = defaultdict(set)
    for ann in instances["annotations"]:
        try:
            if ann.get("iscrowd", 0):
                continue
            seen[int(ann["image_id"])].add(index[int(ann["category_id"])])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{path}: annotation {ann!r:.100} lacks an image_id or a known category_id ({exc!r})"
            ) from exc
    return {img: next(iter(cls)) for img, cls in seen.items() if len(cls) == 1}


def _captions_by_image(captions: dict, path: Path) -> dict[int, list[str]]:
    """COCO image id -> its non-empty stripped captions (in file order)."""
    texts: dict[int, list[str]] = defaultdict(list)
    for ann in captions["annotations"]:
        try:
            img, text = int(ann["image_id"]), ann["caption"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: caption annotation {ann!r:.100} lacks image_id or caption ({exc!r})") from exc
        if not isinstance(text, str):
            raise DataError(f"{path}: caption of image {img} is {text!r}; expected a string")
        if text.strip():
            texts[img].append(" ".join(text.split()))
    return texts


def _file_names(instances: dict, path: Path) -> dict[int, str]:
    """COCO image id -> file name."""
    try:
        return {int(im["id"]): str(im["file_name"]) for im in instances["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: an image entry lacks 'id' or 'file_name' ({exc!r})") from exc


def _choose(
    single: dict[int, int], texts: dict[int, list[str]], keep: set[int] | None, max_per_class: int | None
) -> list[tuple[int, int]]:
    """(image id, class id) pairs kept, sorted by class then image id, at most max_per_class per class."""
    pairs = sorted((cls, img) for img, cls in single.items() if texts.get(img) and (keep is None or cls in keep))
    counts: dict[int, int] = defaultdict(int)
    chosen = []
    for cls, img in pairs:
        if max_per_class is not None and counts[cls] >= int(max_per_class):
            continue
        counts[cls] += 1
        chosen.append((img, cls))
    return chosen


def _make_items(
    chosen: list[tuple[int, int]],
    files: dict[int, str],
    texts: dict[int, list[str]],
    class_names: list[str],
    image_dir: Path,
    split_label: str,
) -> list[CaptionedImage]:
    """CaptionedImages for the chosen images; every missing image file is reported at once."""
    items, missing = [], []
    for img, cls in chosen:
        if img not in files:
            raise DataError(f"image id {img} has annotations but no entry in 'images' of the instances file")
        path = image_dir / files[img]
        if not path.is_file():
            missing.append(path)
            continue
        items.append(
            CaptionedImage(
                image_id=f"{image_dir.name}/{Path(files[img]).stem}",
                path=path,
                captions=tuple(texts[img]),
                class_id=cls,
                class_name=class_names[cls],
                split=split_label,
            )
        )
    if missing:
        examples = ", ".join(str(p) for p in missing[:MAX_EXAMPLES])
        raise DataError(
            f"{len(missing)} of {len(chosen)} COCO image files are missing under {image_dir} (e.g. {examples}); "
            "expected root/<split>/<file_name>"
        )
    return items


def _split_label(split: str) -> str:
    """train2017 -> train, val2017 -> val, test2017 -> test (train when unrecognised)."""
    for label in ("train", "val", "test"):
        if split.lower().startswith(label):
            return label
    return "train"
