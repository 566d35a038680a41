"""Trainable networks: E1's image head and text projection, RID, and E2 (head or full ResNet).

In the `frozen` profile every network takes frozen-trunk features (B, F); in the `end2end` profile E2 owns a
ResNet trunk that is trained end to end (see `E2Encoder`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dims: Sequence[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers dims[0] -> dims[1] -> ... with ReLU between (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TextProjection(nn.Module):
    """Frozen-text-embedding -> shared space: FC(text_dim, 2048) - ReLU - FC(2048, 128) (paper's E1 text side)."""

    def __init__(self, text_dim: int, hidden: int = 2048, out_dim: int = 128):
        super().__init__()
        self.net = mlp([text_dim, hidden, out_dim])

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, D)
        return self.net(t)


class ImageHead(nn.Module):
    """E1 image side on trunk features: FC(F, hidden) - ReLU - FC(hidden, 128). (B, F) -> (B, D)."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = mlp([in_dim, hidden, out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RID(nn.Module):
    """Region-identification network: scores each masked variant; softmax over the M variants (Eq.3).

    Three FC layers (512, 256, 128) with ReLU, then a scalar score. Input per variant: the variant's
    features, optionally concatenated with the unmasked image's features (`context=True`, default), so the
    network can compare what was removed with the whole image.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (512, 256, 128), context: bool = True,
                 dropout: float = 0.5):
        super().__init__()
        self.context = context
        dims = [in_dim * (2 if context else 1), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden[-1], 1))

    def forward(self, variants: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """variants (B, M, F), original (B, F) -> logits (B, M)."""
        if self.context:
            if original is None:
                raise ValueError("RID(context=True) needs the unmasked image features")
            variants = torch.cat([variants, original.unsqueeze(1).expand_as(variants)], dim=-1)
        return self.net(variants).squeeze(-1)


class E2Head(nn.Module):
    """E2 on trunk features (frozen profile): feature h = MLP(F -> hidden -> hidden), projection z = FC(h).

    `h` is what the detector scores and what CMLE's L_global shapes; `z` feeds NT-Xent (SimCLR).
    `text_dim` adds a linear map h -> text space for the MSE-distillation ablation (cmg-mse).
    """

    def __init__(self, in_dim: int, hidden: int = 512, proj_dim: int = 128, text_dim: int | None = None):
        super().__init__()
        self.feature = mlp([in_dim, hidden, hidden])
        self.projection = nn.Sequential(nn.ReLU(), nn.Linear(hidden, proj_dim))
        self.to_text = nn.Linear(hidden, text_dim) if text_dim else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.feature(x)
        return h, self.projection(h)


class E2Encoder(nn.Module):
    """E2 trained end to end (end2end profile): ResNet trunk -> h (pooled, F) -> projection MLP -> z."""

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_dim: int = 128, text_dim: int | None = None,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.projection = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, proj_dim))
        self.to_text = nn.Linear(feature_dim, text_dim) if text_dim else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone((images - self.mean) / self.std)
        return h, self.projection(h)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
