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

from .errors import ConfigError, DataError

SCORERS = ("mahalanobis", "knn")
DEFAULT_SCORER = "mahalanobis"
READINGS = ("lle", "supcon")


@dataclass(frozen=True)
class BaseMethod:
    """What a base method is made of and what it needs: the pipeline runs a stage only when a chosen method needs
    it (a run of `raw` computes trunk features and fits detectors, nothing else)."""

    name: str
    summary: str
    er: bool = False  # E2 trains and is scored on CMER / RID-masked images (entity removal)
    le: bool = False  # CMLE guidance (caption clusters)
    mse: bool = False  # MSE distillation to caption embeddings
    trained: bool = True  # has an E2 of its own
    captions: bool = False  # reads captions (text model)
    e1: bool = False  # E1 and CMER's labels
    rid: bool = False  # RID picks test images' masks
    classes: bool = False  # >= 2 labelled normal classes
    own_scorer: str | None = None  # a scoring rule of its own, used instead of detector.scorers


REGISTRY = {m.name: m for m in (  # the one list of methods: config, API, CLI and app read it
    BaseMethod("ssd", "SimCLR features, Mahalanobis score (no language)"),
    BaseMethod("ssd+er", "SSD on images with the entity RID picks removed", er=True, captions=True, e1=True, rid=True),
    BaseMethod("ssd+le", "SSD guided by caption clusters (CMLE)", le=True, captions=True),
    BaseMethod("cmg", "entity removal + caption-guided latent space (the paper's method)", er=True, le=True,
               captions=True, e1=True, rid=True),
    BaseMethod("cmg-mse", "entity removal + MSE distillation to caption embeddings", er=True, mse=True,
               captions=True, e1=True, rid=True),
    BaseMethod("raw", "no training: the frozen trunk's features", trained=False),
    BaseMethod("bliss", "zero-shot image-text scores against class prompts and a dictionary", trained=False,
               captions=True, own_scorer="bliss"),
    BaseMethod("she", "classifier on the normal classes, energy against the predicted class's pattern",
               classes=True, own_scorer="she"),
    BaseMethod("cmda", "SimCLR on views mixed with E1-matched caption partners", captions=True, e1=True),
)}
BASE_METHODS = tuple(REGISTRY)
OWN_SCORER = {m.name: m.own_scorer for m in REGISTRY.values() if m.own_scorer}
NEEDS = ("captions", "e1", "rid", "classes")


def method_choices() -> list[str]:
    """Every method name a run can train, CMLE methods under both readings: what the app's Train page offers."""
    return [n for m in REGISTRY.values() for n in ([f"{m.name}[{r}]" for r in READINGS] if m.le else [m.name])]


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
    def kind(self) -> BaseMethod:
        return REGISTRY[self.base]

    @property
    def trained(self) -> bool:
        """False for `raw` (the frozen trunk's features) and `bliss` (images mapped into the text space): no E2."""
        return self.kind.trained

    @property
    def own_scorer(self) -> str | None:
        """The method's own scoring rule (`bliss`, `she`), used instead of `detector.scorers`; None for the others."""
        return self.kind.own_scorer

    def needs(self) -> set[str]:
        """The inputs and stages this method needs, from NEEDS: captions, e1 (E1 + CMER), rid, classes."""
        return {n for n in NEEDS if getattr(self.kind, n)}

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
    if not m or m.group("base") not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; expected one of {list(BASE_METHODS)}, and for ssd+le / cmg "
                          f"optionally a CMLE reading in brackets: {[f'cmg[{r}]' for r in READINGS]}")
    base, reading = m.group("base"), m.group("reading")
    kind = REGISTRY[base]
    er, le, mse = kind.er, kind.le, kind.mse
    if reading is not None and not le:
        raise ConfigError(f"method {name!r}: only ssd+le and cmg take a CMLE reading ([lle] or [supcon])")
    if reading is not None and reading not in READINGS:
        raise ConfigError(f"method {name!r}: unknown CMLE reading {reading!r}; expected one of {list(READINGS)}")
    if le and reading is None:
        reading = default_reading
    return MethodSpec(name, base, er, le, mse, reading if le else None)


def run_needs(specs) -> set[str]:
    """Union of `MethodSpec.needs` over a run's methods: the stages and inputs the run must provide."""
    return set().union(*(s.needs() for s in specs))


def check_needs(specs, dataset, data_cfg) -> None:
    """DataError when a method needs captions that `dataset` (a CaptionedDataset) does not have: names the
    methods, the dataset and the files a captioned dataset is read from."""
    if dataset.has_captions:
        return
    wanting = [s.name for s in specs if "captions" in s.needs()]
    if wanting:
        free = [m.name for m in REGISTRY.values() if not m.captions]
        where = (dataset.meta or {}).get("captions_expected", "a captions file")
        raise DataError(f"method(s) {wanting} need captions, but dataset {data_cfg.name!r} at {data_cfg.root} has "
                        f"none: expected {where}; the methods that need no captions are {free}")


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
