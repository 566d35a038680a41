"""The two data types every loader produces and every trainer consumes.

* :class:`CaptionedDataset` - images (as file paths, or in memory for a packed dataset), their captions,
  class id/name and split; optionally precomputed caption embeddings.
* :class:`AnomalyTask` - which classes are normal; gives the normal training images and the test set
  (held-out normal images + every image of the anomaly classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CaptionedImage:
    """One image with its captions.

    `path` is an image file on disk (synthetic images are rendered to a cache folder first), so every
    dataset is read the same way. The one exception is a packed dataset (`cmg data pack`, loader ``packed``):
    its pixels live in `CaptionedDataset.images` and `path` is the pseudo path ``<packed file>#<row>``, which
    is never opened; read pixels through `CaptionedDataset.image_array` / `load_image`, which handle both.
    """

    image_id: str
    path: Path
    captions: tuple[str, ...]
    class_id: int
    class_name: str
    split: str = "train"


@dataclass
class CaptionedDataset:
    """A list of captioned images plus the class names (index = class id).

    Optional, for packed datasets (see :mod:`cmg_core.data.packed`):

    * `images`: (N, S, S, 3) uint8 pixels of every item at one size S, in item order; then item paths are
      pseudo paths and pixels come from this array.
    * `caption_embeddings`: text model name -> ((U, T) float32 table of distinct captions, (N, C) int32 index
      of each item's captions into the table, -1 padded).

    Use :meth:`image_array` and :meth:`caption_embeddings_for` to read pixels and embeddings the same way
    for file-backed and packed datasets.
    """

    name: str
    items: list[CaptionedImage]
    class_names: list[str]
    root: Path | None = None
    meta: dict = field(default_factory=dict)
    images: np.ndarray | None = None
    caption_embeddings: dict | None = None

    def __post_init__(self) -> None:
        if not self.items:
            raise DataError(f"dataset {self.name!r} (root={self.root}) contains no images")
        n_items = len(self.items)
        if self.images is not None:
            img = self.images
            if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 4 or img.shape[0] != n_items
                    or img.shape[1] != img.shape[2] or img.shape[3] != 3):
                raise DataError(
                    f"dataset {self.name!r}: in-memory images have shape {getattr(img, 'shape', None)} and dtype "
                    f"{getattr(img, 'dtype', None)}; expected ({n_items}, S, S, 3) uint8"
                )
        for model, entry in (self.caption_embeddings or {}).items():
            try:
                table, index = entry
            except (TypeError, ValueError):
                raise DataError(f"dataset {self.name!r}: caption embeddings of {model!r} must be a (table, index) "
                                "pair") from None
            if (getattr(table, "ndim", 0) != 2 or getattr(index, "ndim", 0) != 2 or index.shape[0] != n_items
                    or (index.size and int(index.max()) >= table.shape[0])):
                raise DataError(
                    f"dataset {self.name!r}: caption embeddings of {model!r} have table "
                    f"{getattr(table, 'shape', None)} and index {getattr(index, 'shape', None)}; expected (U, T) "
                    f"and ({n_items}, C) with entries < U"
                )
        n = len(self.class_names)
        captioned = any(it.captions for it in self.items)  # a dataset has captions for every image or for none
        for it in self.items:
            if not 0 <= it.class_id < n:
                raise DataError(
                    f"dataset {self.name!r}: image {it.image_id!r} has class id {it.class_id}, "
                    f"expected 0..{n - 1}"
                )
            if captioned and not it.captions:
                raise DataError(f"dataset {self.name!r}: image {it.image_id!r} ({it.path}) has no caption")

    # --- list-like access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> CaptionedImage:
        return self.items[i]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int class ids."""
        return np.array([it.class_id for it in self.items], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        return [it.path for it in self.items]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_captions(self) -> bool:
        """False for a folder of plain images (no captions file): only methods that read no text can train."""
        return bool(self.items[0].captions)

    @property
    def num_captions(self) -> int:
        return sum(len(it.captions) for it in self.items)

    @property
    def packed_size(self) -> int | None:
        """The side S of the in-memory images of a packed dataset, None for a file-backed one."""
        return None if self.images is None else int(self.images.shape[1])

    def _check_packed_size(self, size: int | None) -> None:
        if size is not None and int(size) != self.packed_size:
            file = (self.meta.get("packed") or {}).get("file", self.root)
            raise DataError(
                f"dataset {self.name!r} is packed at {self.packed_size}x{self.packed_size} pixels ({file}) but "
                f"{size}x{size} was requested; repack it at that size (`cmg data pack ... --size {size}`) or "
                f"use image size {self.packed_size}"
            )

    def load_image(self, i: int, size: int | None = None):
        """The i-th image as an RGB PIL image (optionally resized to size x size).

        For a packed dataset `size` must be None or the packed size (else DataError)."""
        if self.images is not None:
            from PIL import Image

            self._check_packed_size(size)
            return Image.fromarray(self.images[i])
        from .images import load_rgb

        return load_rgb(self.items[i].path, size=size)

    def image_array(self, rows, size: int | None) -> np.ndarray:
        """(R, size, size, 3) uint8 pixels of the given rows.

        Packed: the stored pixels (`size` must be the packed size or None, else DataError asking to repack).
        File-backed: ``load_rgb(path, size=size)`` of each row, the same pixels the packed file stores.
        With size None a file-backed dataset's images must all have one shape.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.images is not None:
            self._check_packed_size(size)
            return self.images[rows]
        from .images import load_rgb

        arrs = [np.asarray(load_rgb(self.items[int(i)].path, size=size), dtype=np.uint8) for i in rows]
        if not arrs:
            s = 0 if size is None else int(size)
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            raise DataError(f"dataset {self.name!r}: images of different sizes {sorted(shapes)[:3]}; "
                            "give a size to resize them to")
        return np.stack(arrs)

    def _embedding_entry(self, text_model: str):
        table = self.caption_embeddings or {}
        if text_model in table:
            return table[text_model]
        try:  # aliases of one model (e.g. the default's names) resolve to the same weights
            from ..encoders.text import resolve_text_model

            want = resolve_text_model(text_model)[0]
            for name, entry in table.items():
                if resolve_text_model(name)[0] == want:
                    return entry
        except Exception:  # noqa: BLE001 - an unresolvable name simply has no stored embeddings
            pass
        return None

    def caption_embeddings_for(self, rows, text_model: str) -> np.ndarray | None:
        """(R, C, T) float32 stored caption embeddings of the rows, or None when none are stored for `text_model`.

        C is the largest caption count among the rows; an image with fewer captions repeats its own
        cyclically (caption j = captions[j % len]), the layout of `encoders.caption_tensor`.
        """
        entry = self._embedding_entry(text_model)
        if entry is None:
            return None
        table, index = entry
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        sub = np.asarray(index)[rows]  # (R, Cmax), -1 padded
        counts = (sub >= 0).sum(1)
        if len(rows) and counts.min() == 0:
            bad = int(rows[int(np.argmin(counts))])
            raise DataError(f"dataset {self.name!r}: image {self.items[bad].image_id!r} has no stored caption "
                            f"embedding for {text_model!r}")
        c = int(counts.max()) if len(rows) else 0
        cols = np.arange(c)[None, :] % np.maximum(counts, 1)[:, None]  # (R, C)
        picked = np.take_along_axis(sub, cols, axis=1)
        return np.asarray(table, dtype=np.float32)[picked]

    def class_id(self, name_or_id: str | int) -> int:
        """Class id from a class name or id; raises DataError naming the valid choices."""
        if isinstance(name_or_id, (int, np.integer)):
            if not 0 <= int(name_or_id) < self.num_classes:
                raise DataError(
                    f"class id {name_or_id} is out of range for dataset {self.name!r} "
                    f"(expected 0..{self.num_classes - 1})"
                )
            return int(name_or_id)
        if name_or_id in self.class_names:
            return self.class_names.index(name_or_id)
        if isinstance(name_or_id, str) and name_or_id.isdigit():
            return self.class_id(int(name_or_id))
        raise DataError(
            f"unknown class {name_or_id!r} for dataset {self.name!r}; expected one of {self.class_names}"
        )

    def summary(self) -> dict:
        """Counts per class and split, for `cmg data show` and the app."""
        per_class = np.bincount(self.labels, minlength=self.num_classes)
        splits: dict[str, int] = {}
        for it in self.items:
            splits[it.split] = splits.get(it.split, 0) + 1
        return {
            "name": self.name,
            "root": str(self.root) if self.root else None,
            "images": len(self),
            "classes": self.num_classes,
            "captions": self.num_captions,
            "splits": splits,
            "images_per_class": {c: int(n) for c, n in zip(self.class_names, per_class)},
        }


@dataclass(frozen=True)
class AnomalyTask:
    """A one-class anomaly detection task built on a dataset.

    Attributes
    ----------
    normal_classes: class ids treated as normal.
    train_idx: (N_train,) dataset indices of the normal training images.
    test_idx: (N_test,) dataset indices of the test images (held-out normal + all anomaly images).
    test_is_anomaly: (N_test,) 1 for anomaly, 0 for normal.
    """

    dataset_name: str
    normal_classes: tuple[int, ...]
    train_idx: np.ndarray
    test_idx: np.ndarray
    test_is_anomaly: np.ndarray
    seed: int = 0

    def describe(self, dataset: CaptionedDataset) -> str:
        names = [dataset.class_names[c] for c in self.normal_classes]
        return (
            f"normal classes {names}: {len(self.train_idx)} normal train images; test "
            f"{int((self.test_is_anomaly == 0).sum())} normal + {int(self.test_is_anomaly.sum())} anomaly"
        )


def make_task(
    dataset: CaptionedDataset,
    normal_classes: Sequence[str | int] | None = None,
    n_normal: int | None = None,
    seed: int = 0,
    holdout: float | str = 0.2,
) -> AnomalyTask:
    """Build an :class:`AnomalyTask`.

    Either `normal_classes` (names or ids, or "all") or `n_normal` (that many classes drawn at random with
    `seed`); a dataset of one class needs neither. Normal images are split into train and held-out test either
    by a seeded per-class fraction (`holdout=0.2`, the default) or by the dataset's own split labels
    (`holdout="split"`: images marked `test` are held out, `train`/`val` are training images). Every image of a
    non-normal class is a test anomaly. With every class normal (one-class training: a folder of normal images
    only) the test set is the held-out normal images and the run reports no ranking metrics.
    """
    rng = np.random.default_rng(seed)
    if normal_classes is not None and n_normal is not None:
        raise DataError("give either normal_classes or n_normal, not both")
    if isinstance(normal_classes, str) and normal_classes == "all" or (
            normal_classes is None and n_normal is None and dataset.num_classes == 1):
        normal_classes = list(range(dataset.num_classes))
    if normal_classes is not None:
        normal = sorted({dataset.class_id(c) for c in normal_classes})
        if not normal:
            raise DataError("normal_classes is empty; expected at least one class")
    elif n_normal is not None:
        if not 1 <= n_normal < dataset.num_classes:
            raise DataError(
                f"the task asks for {n_normal} normal classes but dataset {dataset.name!r} has "
                f"{dataset.num_classes} classes; expected 1..{dataset.num_classes - 1} "
                "(at least one class must remain as anomaly)"
            )
        normal = sorted(rng.choice(dataset.num_classes, size=n_normal, replace=False).tolist())
    else:
        raise DataError("an anomaly task needs normal_classes (class names, ids or \"all\") or n_normal")

    labels = dataset.labels
    is_normal = np.isin(labels, normal)
    train, held = [], []
    for c in normal:
        idx = np.flatnonzero(labels == c)
        if holdout == "split":
            splits = np.array([dataset.items[i].split for i in idx])
            train.extend(idx[splits != "test"].tolist())
            held.extend(idx[splits == "test"].tolist())
        else:
            frac = float(holdout)
            if not 0.0 < frac < 1.0:
                raise DataError(f"holdout={holdout!r}: expected a fraction in (0, 1) or 'split'")
            perm = rng.permutation(idx)
            n_held = max(1, int(round(frac * len(idx))))
            if n_held >= len(idx):
                raise DataError(
                    f"class {dataset.class_names[c]!r} has {len(idx)} images: too few to hold out "
                    f"{frac:.0%} for testing and still train"
                )
            held.extend(perm[:n_held].tolist())
            train.extend(perm[n_held:].tolist())
    anomalies = np.flatnonzero(~is_normal)
    test_idx = np.concatenate([np.sort(held), anomalies]).astype(np.int64)
    test_is_anomaly = np.concatenate([np.zeros(len(held)), np.ones(len(anomalies))]).astype(np.int64)
    if len(train) == 0 or len(held) == 0:
        raise DataError(f"task on {dataset.name!r} with normal classes {normal} has an empty train or test split")
    return AnomalyTask(
        dataset_name=dataset.name,
        normal_classes=tuple(normal),
        train_idx=np.sort(np.array(train, dtype=np.int64)),
        test_idx=test_idx,
        test_is_anomaly=test_is_anomaly,
        seed=seed,
    )
