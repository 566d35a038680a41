"""The detectors a run fits on a method's features: Mahalanobis / k-NN from the `detector` config section, and
SHE's and BLISS's own rules (cmg_core.she, cmg_core.bliss)."""
from __future__ import annotations

import numpy as np

from ..config import DetectorConfig
from ..detector import make_detector
from ..methods import MethodSpec
from .untrained import run_text_encoder


def fit_detectors(run, spec: MethodSpec, h: np.ndarray, scorers: list[str], model=None,
                  detector_cfg: DetectorConfig | None = None) -> dict:
    """{scorer: detector fitted on the normal training rows of h (R, D)}: bliss and she by their own rules,
    mahalanobis / knn from the `detector` config section (`detector_cfg`, default the run's)."""
    d = detector_cfg or run.cfg.detector
    n, out = run.n_train, {}
    for s in scorers:
        if s == "bliss":
            out[s] = bliss_detector(run, h[:n], model, d)
        elif s == "she":
            out[s] = she_detector(run, model, h[:n], d)
        else:
            out[s] = make_detector(s, d, run.cfg.train.seed).fit(h[:n])
    return out


def she_detector(run, model, train_feats: np.ndarray, d: DetectorConfig):
    """SHE's stored patterns from the normal training images' features and E2's classifier (its `to_text` head)."""
    from ..she import SHEDetector

    n = len(train_feats)
    head = model.to_text
    det = SHEDetector(head.weight.detach().float().cpu().numpy(), head.bias.detach().float().cpu().numpy(),
                      seed=run.cfg.train.seed, fpr=d.fpr, calibration_folds=d.calibration_folds)
    return det.fit(train_feats, run.class_labels[:n])


def bliss_detector(run, train_feats: np.ndarray, model, d: DetectorConfig):
    """BLISS fitted on the normal training images in the text model's space: prompts of the task's normal class
    names and the dictionary, embedded by the text model (or by the CLIP `model` that embedded the images)."""
    from ..bliss import BLISSDetector, class_prompts, load_dictionary

    cfg = run.cfg
    names = [run.ds.class_names[c] for c in run.task.normal_classes]
    words = load_dictionary(cfg.bliss.dictionary)
    texts = class_prompts(names, cfg.bliss.prompt) + words
    if hasattr(model, "encode_texts"):  # CLIP
        emb = model.encode_texts(texts)  # (C + J, D)
    else:
        emb = run_text_encoder(run).encode(texts)  # (C + J, T)
    det = BLISSDetector(emb, len(names), cfg.bliss.k, cfg.bliss.weight, seed=cfg.train.seed, fpr=d.fpr,
                        calibration_folds=d.calibration_folds, entries=texts)
    return det.fit(train_feats)
