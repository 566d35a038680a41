"""A CLIP model through open_clip, for BLISS: images and texts embedded in one joint space.

Optional (`pip install "cmg-anomaly[clip]"`, i.e. open_clip_torch). Local weights by default, since this tool runs
offline: `bliss.clip_model` names the architecture (an open_clip name such as "ViT-B-32", or a model-config JSON
file for any other, e.g. a small model of your own) and `bliss.clip_weights` a checkpoint file of it (open_clip's
format: a state dict). With internet, `bliss.clip_weights` may instead be one of open_clip's pretrained tags for
that architecture ("openai", "laion2b_s34b_b79k", ...), which open_clip downloads.

Images enter as (B, 3, S, S) floats in [0, 1] at the run's `data.image_size` (what training and the Predictor both
hold), are resized to the model's input size and normalised with its mean and std.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..utils import resolve_device


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError("bliss.clip_model needs open_clip: pip install open_clip_torch (the package's [clip] "
                          "extra)") from exc
    return open_clip


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


class CLIPEncoder:
    """open_clip model, frozen: `encode_images((B, 3, S, S) in [0, 1]) -> (B, D)` and `encode_texts(N strings) ->
    (N, D)`, both L2-normalised float32 numpy arrays.

    model: an open_clip architecture name or a model-config JSON file; weights: a checkpoint file (or an open_clip
    pretrained tag, downloaded); device: "auto" | "cpu" | "cuda" | ...
    """

    def __init__(self, model: str, weights: str, device: str = "auto", batch_size: int = 64):
        oc = _open_clip()
        self.model_name, self.weights, self.batch_size = str(model), str(weights), batch_size
        self.device = resolve_device(device)
        name = self.model_name
        cfg_file = Path(name)
        if cfg_file.suffix == ".json":
            if not cfg_file.is_file():
                raise ConfigError(f"bliss.clip_model={name!r}: no such model-config file")
            oc.add_model_config(cfg_file)
            name = cfg_file.stem
        if oc.get_model_config(name) is None:
            raise ConfigError(f"bliss.clip_model={name!r} is not an open_clip architecture; expected one of "
                              f"open_clip.list_models() or a model-config JSON file")
        if not Path(self.weights).is_file() and self.weights not in oc.list_pretrained_tags_by_model(name):
            raise ConfigError(f"bliss.clip_weights={self.weights!r}: expected a checkpoint file of {name} or one of "
                              f"its open_clip pretrained tags {oc.list_pretrained_tags_by_model(name)}")
        try:
            self.model = oc.create_model(name, pretrained=self.weights, device=self.device)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"could not load CLIP {name!r} from {self.weights!r}: {exc}") from exc
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = oc.get_tokenizer(name)
        visual = self.model.visual
        self.image_size = _pair(getattr(visual, "image_size", 224))
        pre = getattr(visual, "preprocess_cfg", None) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean, std = pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def state_dict(self) -> dict:
        """Nothing to store in a run's model file: the weights stay where `bliss.clip_weights` points."""
        return {}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) float images in [0, 1] -> (B, D) unit vectors."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"CLIPEncoder.encode_images expects (B, 3, S, S) images, got {tuple(images.shape)}")
        out = []
        for s in range(0, len(images), self.batch_size):
            x = images[s : s + self.batch_size].float()
            if tuple(x.shape[-2:]) != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            x = ((x.clamp(0, 1) - self._mean) / self._std).to(self.device)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, D) unit vectors."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[s : s + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(out).numpy()


def clip_encoder(bliss_cfg, device: str = "auto") -> CLIPEncoder | None:
    """The CLIP of a `bliss` config section, or None when BLISS uses E1 in the text model's space (the default)."""
    if not bliss_cfg.clip_model:
        return None
    return CLIPEncoder(bliss_cfg.clip_model, bliss_cfg.clip_weights, device)
