"""Training: one pipeline (`run.Run`) for both profiles; `frozen` and `end2end` are its feature backends."""
from ..methods import BASE_METHODS, MethodSpec, method_label, parse_method
from .run import Run, caption_tensor, train_run

__all__ = ["BASE_METHODS", "MethodSpec", "Run", "caption_tensor", "method_label", "parse_method", "train_run"]
