"""Methods without an E2 of their own: `raw` (the frozen trunk's features) and `bliss` (images mapped into the text
model's space: a ridge map of trunk features, or CLIP's image tower). Also the run's text encoder and that map,
which language.npz shares (records.write_language_explainer)."""
from __future__ import annotations

import numpy as np
import torch

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
