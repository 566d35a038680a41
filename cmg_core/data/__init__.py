"""Captioned-image datasets, anomaly tasks and the loader registry."""
from .registry import DATASETS, dataset_names, load_dataset
from .types import AnomalyTask, CaptionedDataset, CaptionedImage, make_task

__all__ = [
    "AnomalyTask",
    "CaptionedDataset",
    "CaptionedImage",
    "DATASETS",
    "dataset_names",
    "load_dataset",
    "make_task",
]
