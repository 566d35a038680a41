"""Python API in the scikit-learn / PyOD shape: fit a detector, score, flag, explain, save and load.

    from cmg_core import CMG, SSD

    det = CMG("configs/demo.yaml", run_dir="runs/my_cmg").fit()         # the data named in the config
    det = SSD(data={"name": "folder", "root": "my_images"}).fit()        # or any config section as a dict
    det.decision_function(["a.png", "b.png"])    # (N,) scores, higher = more anomalous
    det.predict(["a.png", "b.png"])              # (N,) 1 = anomalous at the calibrated threshold (detector.fpr)
    det.explain("a.png")                         # RID's mask, score, percentile, verdict, and in words: nearest
                                                 # normal captions, dictionary words, caption cluster
    det.save("my_detector")                      # a run folder (no pickles: cmg_core.artifacts)
    det = CMG.load("my_detector")
    knn = SSD(scorer="knn")                      # SSD's features, k-NN score (detector.knn_k neighbours)
    base = RawKNN().fit("my_images")             # no training: k-NN on the frozen trunk's features
    base = RawKNN().fit(x_train)                 # or arrays: (N, H, W, 3) uint8 / float in [0, 1]
    base.decision_function(x_test)

`fit` trains one run with this method only through the same pipeline as `cmg train`, running only the stages the
method needs (`raw`: trunk features and detectors; `cmg`: text, E1, CMER, RID, CMLE, E2, detectors), into `run_dir`
(default: a new folder under `runs/`); the fitted detector is that run folder. `fit(dataset)` takes a folder of the
user's images (loader `folder`: plain images, `<class>/` sub-folders, or captioned layouts), a list of image paths,
images as arrays (stored once as PNG files in the cache: `cmg_core.data.arrays`), or a data-section dict; the images given are the normal ones unless the config's `task` says otherwise.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .data.arrays import EXPECTED, is_array_batch, scoring_inputs, stored_array_images
from .errors import ConfigError, DataError


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


class Detector:
    """Parameters: config (YAML path or None for the defaults), method (default: the class's), run_dir (where
    `fit` writes the run folder), overrides (`key=value` strings as for `cmg train --set`), device, and any
    config section as a dict keyword (`data={...}`, `e2={"epochs": 10}`, ...).

    Fitted attributes: run_dir_ (the run folder), threshold_ (the calibrated threshold), metrics_ (the run's test
    metrics of this method: AUROC etc. and the share of held-out normal images flagged).
    """

    method = "cmg"
    scorer: str | None = None  # None: the method's primary score (Mahalanobis, or its own rule: bliss, she)

    def __init__(self, config: str | Path | None = None, *, method: str | None = None, scorer: str | None = None,
                 run_dir: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                 device: str = "cpu", **sections: dict):
        from .methods import SCORERS, parse_method, primary_scorer

        self.config = config
        self.method = method or type(self).method
        self.scorer = scorer or type(self).scorer or primary_scorer(self.method)
        allowed = parse_method(self.method).scorers(SCORERS)
        if self.scorer not in allowed:
            raise ConfigError(f"{type(self).__name__}(scorer={self.scorer!r}): expected one of {list(allowed)}")
        self.run_dir = run_dir
        self.overrides = tuple(overrides)
        self.device = device
        self.sections = sections

    # --- fitting --------------------------------------------------------------------------------------

    def make_config(self, dataset: Any = None):
        """The RunConfig `fit(dataset)` trains with."""
        from .config import RunConfig, from_dict, load_config, to_dict

        cfg = load_config(self.config, self.overrides)
        data = to_dict(cfg)
        for name, section in self.sections.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{type(self).__name__}({name}=...) expects a dict (a config section), "
                                  f"got {type(section).__name__}")
            _deep_update(data.setdefault(name, {}), section)
        if is_array_batch(dataset):  # stored once as PNG files in the cache, then a list of paths
            dataset = [str(p) for p in stored_array_images(dataset)]
        if isinstance(dataset, (str, Path)):
            _deep_update(data, {"data": {"name": "folder", "root": str(dataset), "options": {}}})
        elif isinstance(dataset, (list, tuple)) and all(isinstance(f, (str, Path)) for f in dataset):
            files = [str(Path(f).absolute()) for f in dataset]
            root = os.path.commonpath([str(Path(f).parent) for f in files]) if files else "."
            _deep_update(data, {"data": {"name": "folder", "root": root, "options": {"files": files}}})
        elif isinstance(dataset, dict):
            _deep_update(data, {"data": dataset})
        elif dataset is not None:
            raise DataError(f"fit(dataset): expected a folder path, a list of image paths, {EXPECTED}, or a "
                            f"data-section dict; got {type(dataset).__name__}")
        task = data.setdefault("task", {})
        if dataset is not None and task.get("normal_classes") is None and task.get("n_normal") is None:
            task["normal_classes"] = "all"  # the user's images are the normal ones, whatever their folders
        out = Path(self.run_dir) if self.run_dir else Path(tempfile.mkdtemp(prefix=f"api_{_slug(self.method)}_",
                                                                            dir=_mkdir("runs")))
        data.update(name=out.name, out_dir=str(out.parent))
        data.setdefault("train", {})["methods"] = [self.method]
        scorers = list(data.setdefault("detector", {}).get("scorers") or [])
        if self.scorer in ("mahalanobis", "knn") and self.scorer not in scorers:
            data["detector"]["scorers"] = scorers + [self.scorer]
        return from_dict(RunConfig, data)

    def fit(self, dataset: Any = None, progress=None) -> "Detector":
        """Train the method on the normal training images of the configured task; returns self."""
        from .train import train_run

        cfg = self.make_config(dataset)
        path = train_run(cfg, progress=progress, overwrite=True)
        return self._attach(path)

    def _attach(self, path: str | Path) -> "Detector":
        from .predict import Predictor

        self.predictor_ = Predictor.load(path, device=self.device)
        if self.key not in self.predictor_.methods:
            raise DataError(f"run folder {path} has no method {self.key!r}; it has {self.predictor_.methods}")
        self.run_dir_ = Path(path)
        det = self.predictor_.detectors[self.key]
        self.threshold_ = det.threshold_
        self.metrics_ = self.predictor_.run.metrics().get(self.key, {})
        return self

    @property
    def key(self) -> str:
        """The run folder's name of this method under this scorer: `cmg`, `cmg@knn`."""
        from .methods import scored_key

        return scored_key(self.method, self.scorer)

    def _check(self) -> None:
        if not hasattr(self, "predictor_"):
            raise ConfigError(f"{type(self).__name__} is not fitted; call fit() or {type(self).__name__}.load(path)")

    # --- scoring --------------------------------------------------------------------------------------

    def decision_function(self, images: list, batch_size: int = 64) -> np.ndarray:
        """(N,) anomaly scores (higher = more anomalous) of image paths, PIL images or arrays (an (N, H, W, 3)
        batch, uint8 or float in [0, 1])."""
        self._check()
        return self.predictor_.score(scoring_inputs(images), self.key, batch_size=batch_size)

    def predict(self, images: list, batch_size: int = 64) -> np.ndarray:
        """(N,) 1 = anomalous (score above the calibrated threshold), 0 = normal."""
        return (self.decision_function(images, batch_size) > self.threshold_).astype(np.int64)

    def explain(self, image) -> dict:
        """One image: RID's mask choice and probabilities, the masked image, score, percentile among normal
        images, threshold and its meaning, verdict, and `language` (cmg_core.language: the nearest normal training
        captions, the closest dictionary words and caption cluster; None for a run without a frozen E1 trunk)."""
        self._check()
        res = self.predictor_.explain(image)
        m = self.key
        return {"rid_choice": res["rid_choice"], "rid_probs": res["rid_probs"], "masked_image": res["masked_image"],
                "image": res["image"], "score": res["scores"][m], "percentile": res["percentiles"][m],
                "threshold": res["thresholds"][m], "threshold_meaning": res["threshold_meaning"][m],
                "anomalous": res["anomalous"][m], "language": res.get("language")}

    # --- persistence ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Copy the fitted run folder to `path` (without resumable checkpoints); returns `path`."""
        self._check()
        dst = Path(path)
        if dst.exists():
            raise DataError(f"{dst} exists; save() writes a new folder")
        shutil.copytree(self.run_dir_, dst, ignore=shutil.ignore_patterns("checkpoints"))
        (dst / "checkpoints").mkdir(exist_ok=True)
        return dst

    @classmethod
    def load(cls, path: str | Path, method: str | None = None, scorer: str | None = None,
             device: str = "cpu") -> "Detector":
        """A fitted detector from a run folder (written by `save`, `fit` or `cmg train`): this class's method and
        scorer, or `method` / `scorer`; `Detector.load` of a one-method folder takes its method."""
        from .runs import Run

        run = Run.open(path)
        chosen = method or (run.methods[0] if cls is Detector and len(run.methods) == 1 else cls.method)
        det = cls(run.path / "config.yaml", method=chosen, scorer=scorer, run_dir=run.path, device=device)
        return det._attach(run.path)

    def __repr__(self) -> str:
        state = f"fitted: {self.run_dir_}" if hasattr(self, "run_dir_") else "not fitted"
        return f"{type(self).__name__}(method={self.method!r}, scorer={self.scorer!r}, {state})"


def _slug(method: str) -> str:
    from .runs import method_slug

    return method_slug(method)


def _mkdir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


class CMG(Detector):
    """CMG: entity removal (CMER + RID) and caption-guided latent space (CMLE) on top of SSD."""

    method = "cmg"


class SSD(Detector):
    """SSD: SimCLR features and a Mahalanobis score (no language guidance)."""

    method = "ssd"


class SSDER(Detector):
    method = "ssd+er"


class SSDLE(Detector):
    method = "ssd+le"


class CMGMSE(Detector):
    method = "cmg-mse"


class RawKNN(Detector):
    """No training: the k-NN score on the frozen trunk's features (method `raw`, scorer `knn`), the baseline the
    trained methods should beat (on UCM it beats them, README)."""

    method = "raw"
    scorer = "knn"


class BLISS(Detector):
    """BLISS (Goodge et al.): zero-shot scores from image-text similarities to the normal class names' prompts and a
    dictionary, bias-corrected with the normal training images (config section `bliss`). No E2. The similarities
    are E1's (images mapped into the text model's space) or, with `bliss.clip_model` and `bliss.clip_weights`
    set, a CLIP's through open_clip."""

    method = "bliss"


class SHE(Detector):
    """SHE (Zhang et al., ICLR 2023): a classifier on the normal classes, energy against the stored pattern of the
    predicted class. Needs >= 2 normal classes with labels."""

    method = "she"
