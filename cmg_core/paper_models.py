"""Networks of the `paper` profile (see cmg_core.paper): E1 (ResNet + ImageHead, TextProjection), the E2
training wrapper, their builders, the ranks-aware NT-Xent `nt_xent_ids`, and atomic checkpoint saving.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .encoders import Normalize, build_backbone
from .models import E2Encoder, ImageHead, TextProjection
from .utils import atomic_path


class E1Image(nn.Module):
    """E1 image side: normalise -> ResNet -> pooled features (B, F) -> ImageHead -> (B, D)."""

    def __init__(self, backbone: nn.Module, spec, head_hidden: int, embed_dim: int):
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.backbone = backbone
        self.head = ImageHead(spec.feature_dim, head_hidden, embed_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return f, self.head(f)


class E1Pair(nn.Module):
    """E1: image network + projection of the frozen caption embeddings, one module for DDP."""

    def __init__(self, image: E1Image, text: TextProjection):
        super().__init__()
        self.image = image
        self.text = text

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images)[1], self.text(captions)


class _E2Train(nn.Module):
    """E2Encoder with the text map in forward, so DDP sees every parameter used in one forward call."""

    def __init__(self, enc: E2Encoder):
        super().__init__()
        self.enc = enc

    def forward(self, images: torch.Tensor):
        h, z = self.enc(images)
        return h, z, (self.enc.to_text(h) if self.enc.to_text is not None else None)


def build_e1(cfg: RunConfig, text_dim: int) -> tuple[E1Pair, int]:
    backbone, spec = _backbone(cfg)
    e1 = E1Pair(E1Image(backbone, spec, cfg.model.head_hidden, cfg.model.embed_dim),
                TextProjection(text_dim, cfg.model.text_hidden, cfg.model.embed_dim))
    return e1, spec.feature_dim


def build_e2(cfg: RunConfig, text_dim: int | None) -> E2Encoder:
    backbone, spec = _backbone(cfg)
    return E2Encoder(backbone, spec.feature_dim, cfg.model.embed_dim, text_dim, mean=spec.mean, std=spec.std)


def _backbone(cfg: RunConfig):
    name = cfg.model.backbone
    pretrained = cfg.model.pretrained if name == "efficientnet_lite0" else False
    return build_backbone(name, pretrained=pretrained, cifar_stem=cfg.model.cifar_stem, weights=cfg.model.backbone_weights)


def nt_xent_ids(z1: torch.Tensor, z2: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent where views of the same image id (other than the anchor's own pair) are not negatives.

    Equals `losses.nt_xent_loss` when the ids are unique (used for batches gathered from several ranks).
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / temperature
    ids2 = torch.cat([ids, ids]).to(z.device)
    idx = torch.arange(b, device=z.device)
    target = torch.cat([idx + b, idx])
    same = ids2.unsqueeze(0) == ids2.unsqueeze(1)
    same[torch.arange(2 * b, device=z.device), target] = False
    return F.cross_entropy(sim.masked_fill(same, float("-inf")), target)


def _save(obj, path: Path) -> None:
    """torch.save to `path` atomically (written to a temporary file, then renamed)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
