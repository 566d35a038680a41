"""Batched SimCLR augmentation on the device for the `paper` profile (see cmg_core.paper).

Every image of the task is kept on the device as uint8; SimCLR augmentations (random resized crop, flip, colour
jitter, grayscale; the ranges of `features.simclr_augment`) are drawn per image and applied to whole batches on
the device (`batch_simclr_augment`: one `grid_sample` + vectorised colour ops), so no data-loader workers are
needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def batch_simclr_augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """SimCLR augmentation of a batch, parameters drawn per image from `gen` (a CPU generator).

    x (B, 3, H, W) float in [0, 1], any device -> same shape. The ranges are those of
    `features.simclr_augment`: RandomResizedCrop(scale (1 - 0.6 s, 1), ratio (3/4, 4/3)), horizontal flip
    p=0.5, colour jitter p=0.8 (brightness/contrast/saturation 0.4 s, hue 0.1 s; hue as a rotation of the
    YIQ chroma plane), grayscale p=0.2 s. The crop + flip is one bilinear `grid_sample`.
    """
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype

    def u(lo, hi, n=b):
        return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(dev, dt)

    area = 1.0 - 0.6 * strength + 0.6 * strength * torch.rand(b, generator=gen)
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(b, generator=gen)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(b, generator=gen) - 1)  # crop centre in [-1, 1] coordinates
    cy = (1 - ch) * (2 * torch.rand(b, generator=gen) - 1)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
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
