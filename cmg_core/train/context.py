"""What the feature backends (`frozen`, `end2end`) and RID's stage are handed: the task's rows and config, where
they compute (`devices.Devices`) and what they write (`records.RunIO`). Results of earlier stages (captions,
CMER's labels) are passed to them as arguments, never read from the pipeline's state."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import E2Config, RunConfig
from ..methods import MethodSpec
from .devices import Devices
from .records import RunIO


@dataclass(frozen=True)
class StageContext:
    """cfg: the run's config; ds: its dataset; rows (R,): dataset indices, the first `n_train` the normal training
    images; mask_apply: where CMER's masks act (`pixel` / `feature`); dev, io: see the module docstring."""

    cfg: RunConfig
    ds: object
    rows: np.ndarray
    n_train: int
    mask_apply: str
    dev: Devices
    io: RunIO

    def stage_seed(self, k: int) -> int:
        """The seed of stage k (1 E1, 2 RID, 3 views, 4 GMM, 5 E2) of this run."""
        return self.cfg.train.seed * 1000 + k

    def e2_config(self, spec: MethodSpec) -> E2Config:
        return e2_config_for(self.cfg, spec)


def e2_config_for(cfg: RunConfig, spec: MethodSpec) -> E2Config:
    """The e2 section `spec` trains with: its epochs from protocol.method_epochs (by name, label or base method)
    when listed there."""
    per = cfg.protocol.method_epochs
    for key in (spec.name, spec.label, spec.base):
        if key in per:
            return dataclasses.replace(cfg.e2, epochs=int(per[key]))
    return cfg.e2
