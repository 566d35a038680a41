"""The features and detectors of the methods without an E2 of their own: `raw` (the frozen trunk's features) and
`bliss` (images mapped into the text model's space, scored against class prompts and a dictionary; cmg_core.bliss),
and SHE's detector on E2's classifier (`she`)."""
from __future__ import annotations

import numpy as np
import torch

from ..config import DetectorConfig
from ..detector import make_detector
from ..methods import MethodSpec


def text_space_map(trunk_feats: np.ndarray, caption_mean: np.ndarray, alpha: float) -> torch.nn.Linear:
    """E1 in the text model's space: a ridge regression (sklearn, `bliss.ridge_alpha`) from the normal training
    images' trunk features (N, F) to their mean caption embeddings (N, T), as a Linear(F, T)."""
    from sklearn.linear_model import Ridge

    ridge = Ridge(alpha=alpha).fit(trunk_feats, caption_mean)
    lin = torch.nn.Linear(trunk_feats.shape[1], caption_mean.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(ridge.coef_, dtype=np.float32)))
        lin.bias.copy_(torch.from_numpy(np.asarray(ridge.intercept_, dtype=np.float32)))
    return lin.eval()


def run_text_space_map(run) -> torch.nn.Linear:
    """`text_space_map` of the run's normal training images, fitted once per run (bliss's model, language.npz)."""
    if getattr(run, "_text_space_map", None) is None:
        n = run.n_train
        run._text_space_map = text_space_map(run.feats.orig[:n].float().numpy().astype(np.float64),
                                             run.caption_mean[:n].numpy().astype(np.float64),
                                             run.cfg.bliss.ridge_alpha)
    return run._text_space_map


def run_text_encoder(run):
    """The run's text encoder, made once: its model loads on first use only (bliss's prompts, language.npz)."""
    from ..encoders import TextEncoder

    if getattr(run, "_text_encoder", None) is None:
        run._text_encoder = TextEncoder(run.cfg.model.text_model, device=str(run.dev.device))
    return run._text_encoder


def untrained_model(run, spec: MethodSpec, weights: dict | None = None):
    """The network a method without E2 stores in its model file: bliss's map of trunk features into the text
    model's space (fitted here, or loaded from `weights`), none for raw."""
    if spec.base != "bliss":
        return None
    from ..encoders.clip import clip_encoder

    clip = clip_encoder(run.cfg.bliss, str(run.dev.device))
    if clip is not None:  # images and texts in CLIP's space; its weights stay outside the run folder
        return clip
    if weights:
        lin = torch.nn.Linear(run.feats.orig.shape[1], run.caption_mean.shape[1])
        lin.load_state_dict(weights)
        return lin.eval()
    return run_text_space_map(run)


@torch.no_grad()
def untrained_features(run, spec: MethodSpec, model=None) -> np.ndarray:
    """(R, D) features of every row: the images in the text model's space (bliss, `model` the map) or the trunk's
    features (raw)."""
    if spec.base == "bliss" and hasattr(model, "encode_images"):  # CLIP: the images of every row
        from ..features import load_images, to_float

        return model.encode_images(to_float(load_images(run.ds, run.rows, run.cfg.data.image_size)))
    if spec.base == "bliss":
        return model(run.feats.orig.float()).numpy().astype(np.float32)
    return run.feats.orig.numpy().astype(np.float32)


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


@torch.no_grad()
def cmda_pairs(run):
    """(cmda config, partners (N, k), weights (N, k)) of the normal training images: S[i, j] = E1's matching score
    (Eq.2, cosine in E1's joint space) of image j against the mean of image i's caption embeddings."""
    import torch.nn.functional as F

    from ..cmda import cmda_partners

    n, e1 = run.n_train, run.e1.model
    img = F.normalize(e1.image.eval()(run.feats.orig[:n].float()), dim=-1)  # (N, D)
    txt = F.normalize(e1.text.eval()(run.captions[:n].float()), dim=-1).mean(1)  # (N, D) mean over captions
    sim = (F.normalize(txt, dim=-1) @ img.T).numpy()  # (N, N): row i = captions of i, column j = image j
    partners, weights = cmda_partners(sim, run.cfg.cmda.neighbors, run.cfg.cmda.max_mix)
    run.io.log(f"CMDA: {partners.shape[1]} partners per image, mean weight {weights.mean():.3f}")
    return run.cfg.cmda, partners, weights


def write_language_explainer(run) -> None:
    """language.npz in the run folder (cmg_core.language): what a new image is close to in words. Needs a frozen E1 trunk and
    the text model (to embed the dictionary); skipped with a log line otherwise."""
    from ..bliss import load_dictionary
    from ..errors import CMGError
    from ..language import build_explainer

    cfg, n = run.cfg, run.n_train
    if cfg.e1.encoder != "frozen":
        return
    try:
        words = load_dictionary(cfg.bliss.dictionary)
        word_emb = run_text_encoder(run).encode(words)
        try:
            labels = run.clusters_and_weights()[0]
        except CMGError:  # fewer training images than caption clusters
            labels = np.zeros(n, dtype=int)
        caps = [list(run.ds[i].captions) for i in run.rows[:n]]
        lin = run_text_space_map(run)
        exp = build_explainer(lin.weight.detach().numpy(), lin.bias.detach().numpy(), run.caption_mean[:n].numpy(),
                              caps, run.captions[:n].numpy(), labels, words, word_emb)
        exp.save(run.run_dir / "language.npz")
    except (CMGError, OSError, ImportError) as exc:
        run.io.log(f"language explanations skipped: {exc}")
