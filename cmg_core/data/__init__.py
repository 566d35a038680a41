"""Captioned-image datasets, anomaly tasks and the loader registry."""
from .packed import load_packed, pack_dataset, read_packed_meta
from .registry import DATASETS, FILE_ROOTS, dataset_names, load_data, load_dataset
from .types import AnomalyTask, CaptionedDataset, CaptionedImage, make_task

__all__ = [
    "AnomalyTask",
    "CaptionedDataset",
    "CaptionedImage",
    "DATASETS",
    "FILE_ROOTS",
    "dataset_names",
    "load_data",
    "load_dataset",
    "load_packed",
    "make_task",
    "pack_dataset",
    "read_packed_meta",
]
