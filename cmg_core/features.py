"""Images -> tensors, masked variants and augmented views -> frozen-trunk features (cpu profile).

The `cpu` profile never back-propagates through the trunk, so the trunk's features of every image and of
every masked variant are computed once per (dataset, image size, backbone, mask setting) and cached on disk
(`$CMG_CACHE_DIR/features/<key>.npz`), shared by every task, method and run that uses them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data.images import load_rgb
from .masks import apply_masks, grid_masks
from .utils import atomic_path, cache_dir

ProgressFn = Callable[[str, int, int], None]


def images_to_tensor(images: Sequence, size: int) -> torch.Tensor:
    """PIL images or paths -> (N, 3, size, size) uint8 tensor."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, img in enumerate(images):
        if not hasattr(img, "resize"):
            img = load_rgb(img, size=size)
        elif img.size != (size, size):
            img = img.convert("RGB").resize((size, size))
        out[i] = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return out


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [0, 1]."""
    return x.float().div_(255.0)


def masked_variants(images: torch.Tensor, n_regions: int, mode: str, soft_value: float) -> torch.Tensor:
    """(B, 3, H, W) float images in [0,1] -> (B, M, 3, H, W): region m set to 0 (hard) or scaled (soft)."""
    masks = grid_masks(images.shape[-2], images.shape[-1], n_regions, mode=mode, soft_value=soft_value)
    return apply_masks(images, masks.to(images.device))


def simclr_augment(size: int, strength: float = 1.0):
    """SimCLR-style augmentation on float tensors (crop, flips, colour jitter, grayscale)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(1.0 - 0.6 * strength, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4 * strength, 0.4 * strength, 0.4 * strength, 0.1 * strength)], p=0.8),
        v2.RandomGrayscale(p=0.2 * strength),
    ])


@dataclass
class Trunk:
    """A frozen backbone wrapped with its input normalisation and precision."""

    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    precision: str = "bf16"
    name: str = "efficientnet_lite0"

    @classmethod
    def build(cls, backbone: str, pretrained: bool, device: torch.device, precision: str = "bf16",
              weights: str | None = None, cifar_stem: bool = False) -> "Trunk":
        from .encoders import build_backbone

        model, spec = build_backbone(backbone, pretrained=pretrained, weights=weights, cifar_stem=cifar_stem)
        model.eval().to(device).to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        return cls(model, mean, std, device, precision, backbone)

    @property
    def feature_dim(self) -> int:
        """F of the pooled features (timm models report it; torchvision ResNets are probed once)."""
        if not hasattr(self, "_dim"):
            dim = getattr(self.model, "num_features", 0)
            if not dim:
                with torch.inference_mode():
                    dim = self.model(torch.zeros(1, 3, 32, 32, device=self.device)).shape[1]
            self._dim = int(dim)
        return self._dim

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) float images in [0,1] -> (N, F) float32 features (on CPU)."""
        outs = []
        use_bf16 = self.precision == "bf16"
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                outs.append(self.model(x).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.feature_dim)


def feature_cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def dataset_fingerprint(paths: Sequence[Path]) -> str:
    """Identity of an image list: paths plus sizes and mtimes (a changed file invalidates the cache)."""
    h = hashlib.sha1()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:20]


def cached_mask_features(paths: Sequence[Path], trunk: Trunk, size: int, n_regions: int, mode: str,
                         soft_value: float, batch_size: int = 32, progress: ProgressFn | None = None,
                         use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Trunk features of each image and of each of its M masked variants.

    Returns (orig (N, F), masked (N, M, F)) float32. Cached by dataset fingerprint + settings; the cache
    file is written atomically, so an interrupted computation leaves nothing behind.
    """
    key = feature_cache_key(data=dataset_fingerprint(paths), size=size, trunk=trunk.name, precision=trunk.precision,
                            m=n_regions, mode=mode, soft=soft_value if mode == "soft" else None)
    path = cache_dir("features") / f"{key}.npz"
    if use_cache and path.is_file():
        with np.load(path) as z:
            return z["orig"], z["masked"]
    orig_parts, masked_parts = [], []
    n = len(paths)
    for start in range(0, n, batch_size):
        imgs = to_float(images_to_tensor(paths[start : start + batch_size], size))
        variants = masked_variants(imgs, n_regions, mode, soft_value)  # (b, M, 3, H, W)
        b = imgs.shape[0]
        feats = trunk(torch.cat([imgs, variants.flatten(0, 1)]))  # one batched pass over all M variants
        orig_parts.append(feats[:b].numpy())
        masked_parts.append(feats[b:].view(b, n_regions, -1).numpy())
        if progress:
            progress("trunk features", min(start + batch_size, n), n)
    orig, masked = np.concatenate(orig_parts), np.concatenate(masked_parts)
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, orig=orig, masked=masked)
    return orig, masked


def augmented_view_features(paths: Sequence[Path], mask_index: np.ndarray | None, trunk: Trunk, size: int,
                            n_regions: int, mode: str, soft_value: float, n_views: int, seed: int,
                            batch_size: int = 32, progress: ProgressFn | None = None) -> np.ndarray:
    """(N, V, F) trunk features of V SimCLR-augmented views of each image.

    With `mask_index` (N,) the image is first masked with that region (CMER's choice); -1 or None = no mask.
    """
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchvision v2 draws from the global generator
    aug = simclr_augment(size)
    masks = grid_masks(size, size, n_regions, mode=mode, soft_value=soft_value)
    out = []
    n = len(paths)
    try:
        for start in range(0, n, batch_size):
            imgs = to_float(images_to_tensor(paths[start : start + batch_size], size))
            if mask_index is not None:
                idx = torch.as_tensor(mask_index[start : start + batch_size])
                chosen = masks[idx.clamp(min=0)]  # (b, 1, H, W)
                chosen[idx < 0] = 1.0
                imgs = imgs * chosen
            views = torch.stack([torch.stack([aug(im) for im in imgs]) for _ in range(n_views)], dim=1)
            feats = trunk(views.flatten(0, 1)).view(len(imgs), n_views, -1)
            out.append(feats.numpy())
            if progress:
                progress("augmented views", min(start + batch_size, n), n)
    finally:
        torch.random.set_rng_state(torch_state)  # leave the caller's RNG stream untouched
    return np.concatenate(out)
