"""The features and detectors of the methods without an E2 of their own: `raw` (the frozen trunk's features) and
`bliss` (E1's image embeddings, scored against class prompts and a dictionary; cmg_core.bliss)."""
from __future__ import annotations

import numpy as np
import torch

from ..methods import MethodSpec


def untrained_model(run, spec: MethodSpec):
    """The network a method without E2 stores in its model file: E1's image head for bliss, none for raw."""
    return run.e1.model.image if spec.base == "bliss" else None


@torch.no_grad()
def untrained_features(run, spec: MethodSpec) -> np.ndarray:
    """(R, D) features of every row: E1's image embeddings (bliss) or the trunk's features (raw)."""
    if spec.base == "bliss":
        head = run.e1.model.image.eval()
        return head(run.e1.orig.float()).numpy().astype(np.float32)
    return run.e1.orig.numpy().astype(np.float32)


def bliss_detector(run, train_feats: np.ndarray):
    """BLISS fitted on the normal training images' E1 embeddings: prompts of the task's normal class names and the
    dictionary, embedded by the text model and projected into E1's joint space."""
    from ..bliss import BLISSDetector, class_prompts, load_dictionary
    from ..encoders import TextEncoder

    cfg = run.cfg
    names = [run.ds.class_names[c] for c in run.task.normal_classes]
    words = load_dictionary(cfg.bliss.dictionary)
    texts = class_prompts(names, cfg.bliss.prompt) + words
    emb = TextEncoder(cfg.model.text_model, device=str(run.device)).encode(texts)  # (C + J, T)
    with torch.no_grad():
        joint = run.e1.model.text.eval()(torch.from_numpy(np.asarray(emb, dtype=np.float32))).numpy()
    d = cfg.detector
    det = BLISSDetector(joint, len(names), cfg.bliss.k, cfg.bliss.weight, seed=cfg.train.seed, fpr=d.fpr,
                        calibration_folds=d.calibration_folds, entries=texts)
    return det.fit(train_feats)
