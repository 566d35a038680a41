"""Method names. A method is a base method (`ssd`, `ssd+er`, `ssd+le`, `cmg`, `cmg-mse`) with, for the CMLE
methods, an optional reading in brackets: `cmg[lle]` (the paper's Eq.9-13: L_global pulls an image's embedding
towards the LLE combination of its caption neighbours' embeddings) or `cmg[supcon]` (the released code: a
supervised contrastive loss whose positives are the images of the same GMM caption cluster). A plain `cmg` /
`ssd+le` uses `cmle.loss`. `raw` trains nothing: its features are the frozen trunk's (the baseline every
trained method should beat).

Each method's features are scored by each of `detector.scorers`; a scored result is named by its key:
the method for the Mahalanobis score (`cmg`), `<method>@<scorer>` for another scorer (`cmg@knn`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

BASE_METHODS = ("ssd", "ssd+er", "ssd+le", "cmg", "cmg-mse", "raw", "bliss", "she", "cmda")
SCORERS = ("mahalanobis", "knn")
DEFAULT_SCORER = "mahalanobis"
OWN_SCORER = {"bliss": "bliss", "she": "she"}  # methods with a scoring rule of their own: that rule only, named by the method
READINGS = ("lle", "supcon")
_USES = {  # base method -> (masked images (ER), CMLE (LE), MSE distillation)
    "ssd": (False, False, False), "ssd+er": (True, False, False), "ssd+le": (False, True, False),
    "cmg": (True, True, False), "cmg-mse": (True, False, True), "raw": (False, False, False),
    "bliss": (False, False, False), "she": (False, False, False), "cmda": (False, False, False)}
_NAME = re.compile(r"^(?P<base>[a-z0-9+\-]+)(\[(?P<reading>[a-z]+)\])?$")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # as given in train.methods (run files use it)
    base: str
    er: bool
    le: bool
    mse: bool
    reading: str | None  # lle | supcon for LE methods, else None

    @property
    def trained(self) -> bool:
        """False for `raw` (the frozen trunk's features) and `bliss` (E1's image embeddings): no E2."""
        return self.base not in ("raw", "bliss")

    @property
    def own_scorer(self) -> str | None:
        """The method's own scoring rule (`bliss`, `she`), used instead of `detector.scorers`; None for the others."""
        return OWN_SCORER.get(self.base)

    def scorers(self, configured) -> list[str]:
        """The scores a run gives this method: its own rule only, else each of `configured` (detector.scorers)."""
        return [self.own_scorer] if self.own_scorer else list(configured)

    @property
    def label(self) -> str:
        """Name for tables: LE methods always show their reading, e.g. `cmg[supcon]`."""
        return f"{self.base}[{self.reading}]" if self.le else self.base


def parse_method(name: str, default_reading: str = "lle") -> MethodSpec:
    """'cmg[supcon]' -> MethodSpec(base='cmg', er=True, le=True, mse=False, reading='supcon')."""
    m = _NAME.match(str(name))
    if not m or m.group("base") not in _USES:
        raise ConfigError(f"unknown method {name!r}; expected one of {list(BASE_METHODS)}, and for ssd+le / cmg "
                          f"optionally a CMLE reading in brackets: {[f'cmg[{r}]' for r in READINGS]}")
    base, reading = m.group("base"), m.group("reading")
    er, le, mse = _USES[base]
    if reading is not None and not le:
        raise ConfigError(f"method {name!r}: only ssd+le and cmg take a CMLE reading ([lle] or [supcon])")
    if reading is not None and reading not in READINGS:
        raise ConfigError(f"method {name!r}: unknown CMLE reading {reading!r}; expected one of {list(READINGS)}")
    if le and reading is None:
        reading = default_reading
    return MethodSpec(name, base, er, le, mse, reading if le else None)


def method_label(name: str, default_reading: str = "lle") -> str:
    return parse_method(name, default_reading).label


def primary_scorer(method: str) -> str:
    """The scorer a method's plain name stands for: its own rule (`bliss`), else Mahalanobis."""
    return OWN_SCORER.get(str(method).split("[")[0], DEFAULT_SCORER)


def scored_key(method: str, scorer: str = DEFAULT_SCORER) -> str:
    """Name of a method's result under a scorer: 'cmg' (Mahalanobis), 'cmg@knn', 'bliss' (its own rule)."""
    return method if scorer == primary_scorer(method) else f"{method}@{scorer}"


def split_key(key: str) -> tuple[str, str]:
    """'cmg@knn' -> ('cmg', 'knn'); 'cmg' -> ('cmg', 'mahalanobis'); 'bliss' -> ('bliss', 'bliss')."""
    method, _, scorer = str(key).partition("@")
    return method, scorer or primary_scorer(method)


def key_label(key: str, default_reading: str = "lle") -> str:
    """Table name of a scored key: the method's label, with '@<scorer>' unless Mahalanobis: 'cmg[lle]@knn'."""
    method, scorer = split_key(key)
    return scored_key(method_label(method, default_reading), scorer)
