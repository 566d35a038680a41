"""Training: one pipeline (`run.Training`) for both profiles; `frozen` and `end2end` are its feature backends,
handed a `context.StageContext`."""
from ..methods import BASE_METHODS, MethodSpec, method_label, parse_method
from .run import train_run

__all__ = ["BASE_METHODS", "MethodSpec", "method_label", "parse_method", "train_run"]
