"""Networks trained end to end (`end2end` profile) and the batched SimCLR augmentation they train on.

* `E1Image` / `E1Pair` - E1 trained end to end (`e1.encoder: end2end`): backbone + ImageHead, and the
  projection of the frozen caption embeddings.
* `E2Train` - E2Encoder with the text map in forward, so DDP sees every parameter used in one call.
* `batch_simclr_augment` - SimCLR augmentation drawn per image and applied to a whole batch on its device
  (one `grid_sample` + vectorised colour ops), so no data-loader workers are needed.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Normalize, build_backbone
from ..models import E2Encoder, ImageHead, TextProjection


class E1Image(nn.Module):
    """E1 image side: normalise -> backbone -> pooled features (B, F) -> ImageHead -> (B, D)."""

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


class E2Train(nn.Module):
    """E2Encoder with the text map in forward, so DDP sees every parameter used in one forward call."""

    def __init__(self, enc: E2Encoder):
        super().__init__()
        self.enc = enc

    def forward(self, images: torch.Tensor):
        h, z = self.enc(images)
        return h, z, (self.enc.to_text(h) if self.enc.to_text is not None else None)


def backbone_for(cfg):
    """The trainable backbone of the end2end profile (`model.backbone`, `model.cifar_stem`, `model.width`)."""
    m = cfg.model
    pretrained = m.pretrained if m.backbone == "efficientnet_lite0" else False
    return build_backbone(m.backbone, pretrained=pretrained, cifar_stem=m.cifar_stem, weights=m.backbone_weights,
                          width=m.width)


def build_e1(cfg, text_dim: int) -> tuple[E1Pair, int]:
    backbone, spec = backbone_for(cfg)
    e1 = E1Pair(E1Image(backbone, spec, cfg.model.head_hidden, cfg.model.embed_dim),
                TextProjection(text_dim, cfg.model.text_hidden, cfg.model.embed_dim))
    return e1, spec.feature_dim


def build_e2(cfg, text_dim: int | None) -> E2Encoder:
    backbone, spec = backbone_for(cfg)
    return E2Encoder(backbone, spec.feature_dim, cfg.model.embed_dim, text_dim, mean=spec.mean, std=spec.std)


def batch_simclr_augment(x: torch.Tensor, gen: torch.Generator, crop_scale: tuple = (0.4, 1.0),
                         vflip: bool = False, strength: float = 1.0) -> torch.Tensor:
    """SimCLR augmentation of a batch, parameters drawn per image from `gen` (a CPU generator).

    x (B, 3, H, W) float in [0, 1], any device -> same shape. RandomResizedCrop(scale `crop_scale`, ratio
    (3/4, 4/3)), horizontal flip p=0.5 (and vertical p=0.5 with `vflip`, as the released code's Wikipedia
    loaders), colour jitter p=0.8 (brightness/contrast/saturation 0.4 s, hue 0.1 s; hue as a rotation of the
    YIQ chroma plane), grayscale p=0.2 s. The crop + flips are one bilinear `grid_sample`. The number of
    draws from `gen` does not depend on the options, so every method sees the same random stream.
    """
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype

    def u(lo, hi, n=b):
        return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(dev, dt)

    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    area = lo + (hi - lo) * torch.rand(b, generator=gen)
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(b, generator=gen)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(b, generator=gen) - 1)  # crop centre in [-1, 1] coordinates
    cy = (1 - ch) * (2 * torch.rand(b, generator=gen) - 1)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    vdraw = torch.rand(b, generator=gen)
    vert = torch.where(vdraw < 0.5, -1.0, 1.0) if vflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch * vert, cy
    grid = F.affine_grid(theta.to(dev, dt), [b, 3, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = (torch.rand(b, generator=gen) < 0.8).to(dev, dt).view(b, 1, 1, 1)
    s = 0.4 * strength
    one = torch.ones((), device=dev, dtype=dt)
    bright = torch.lerp(one, u(1 - s, 1 + s).view(b, 1, 1, 1), jitter)
    contrast = torch.lerp(one, u(1 - s, 1 + s).view(b, 1, 1, 1), jitter)
    sat = torch.lerp(one, u(1 - s, 1 + s).view(b, 1, 1, 1), jitter)
    hue = u(-0.1 * strength, 0.1 * strength) * jitter.view(b)
    lum = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=dt).view(1, 3, 1, 1)
    x = (x * bright).clamp(0, 1)
    mean = (x * lum).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = (x * lum).sum(1, keepdim=True)
    x = ((x - gray) * sat + gray).clamp(0, 1)
    # hue: rotate the (I, Q) chroma of YIQ by 2 pi * hue
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev, dtype=dt)
    rgb = torch.linalg.inv(yiq.float()).to(dt)
    ang = 2 * math.pi * hue
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(b, 3, 3, device=dev, dtype=dt)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = rgb.unsqueeze(0) @ rot @ yiq.unsqueeze(0)  # (B, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", mat, x).clamp(0, 1)
    gs = (torch.rand(b, generator=gen) < 0.2 * strength).to(dev, dt).view(b, 1, 1, 1)
    gray = (x * lum).sum(1, keepdim=True).expand_as(x)
    return torch.lerp(x, gray, gs)


def bn_train_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode except its BatchNorm layers, which normalise by each batch's own statistics
    (dropout stays off: the features change only through batch statistics). The original is not touched."""
    clone = copy.deepcopy(model).eval()
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return clone
