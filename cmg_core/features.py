"""Images -> tensors, masked variants and augmented views -> frozen-trunk features (frozen profile).

The `frozen` profile never back-propagates through the trunk, so the trunk's features of every image and of
every masked variant are computed once per (dataset, image size, backbone, mask setting) and cached on disk
(`$CMG_CACHE_DIR/features/<key>.npz`), shared by every task, method and run that uses them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.images import load_rgb
from .errors import ConfigError
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


def masked_average_pool(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a trunk's feature maps with image-space masks (feature-space masking).

    maps (B, C, h, w); masks (B, K, 1, H, W) or (K, 1, H, W) in [0, 1] (1 = keep; the same masks as
    pixel masking). Each map cell is weighted by the mean mask value over the image area it pools
    (`adaptive_avg_pool2d` of the mask to h x w), so a hard-masked region's cells drop out and a soft one's
    are scaled by `soft_value`. Returns (B, K, C) = sum(w * maps) / sum(w). An all-ones mask gives the
    ordinary average pool.
    """
    if maps.dim() != 4:
        raise ConfigError(f"feature maps must be (B, C, h, w), got {tuple(maps.shape)}")
    if masks.dim() == 4:
        masks = masks.unsqueeze(0).expand(maps.shape[0], *masks.shape)
    if masks.dim() != 5 or masks.shape[0] != maps.shape[0] or masks.shape[2] != 1:
        raise ConfigError(f"masks must be (B, K, 1, H, W) or (K, 1, H, W) for maps {tuple(maps.shape)}, "
                          f"got {tuple(masks.shape)}")
    b, k = masks.shape[:2]
    h, w = maps.shape[-2:]
    weights = F.adaptive_avg_pool2d(masks.reshape(b * k, 1, *masks.shape[-2:]).to(maps.dtype), (h, w))
    weights = weights.view(b, k, 1, h, w)
    num = (maps.unsqueeze(1) * weights).sum((-2, -1))  # (B, K, C)
    return num / weights.sum((-2, -1)).clamp_min(1e-6)


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
    """A frozen backbone wrapped with its input normalisation and precision. `key_parts`: what changes its
    features besides `name` and `precision` (`encoders.trunk_key_parts`: non-default settings only), for cache keys."""

    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    precision: str = "bf16"
    name: str = "efficientnet_lite0"
    key_parts: dict = field(default_factory=dict)

    @classmethod
    def build(cls, backbone: str, pretrained: bool, device: torch.device, precision: str = "bf16",
              weights: str | None = None, cifar_stem: bool = False, pool: str = "native") -> "Trunk":
        """`backbone`: a built-in name or `timm:` / `open_clip:` / `hf:` (`encoders.hub`: `weights` a local file,
        `pool` native | maps, the mean of feature maps that `cmer.apply: feature` needs). Random weights
        (pretrained: false, resnets without weights) are drawn with seed 0: every build is the same network (the
        run's, the Predictor's, the one its cached features came from), the caller's RNG untouched."""
        from .encoders import build_backbone, trunk_key_parts

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, spec = build_backbone(backbone, pretrained=pretrained, weights=weights, cifar_stem=cifar_stem,
                                         pool=pool)
        model.eval().to(device).to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        return cls(model, mean, std, device, precision, backbone,
                   trunk_key_parts(backbone, pretrained, weights, cifar_stem, pool))

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
    def _forward(self, fn, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """`fn` on normalised, channels_last batches of (N, 3, H, W) float images in [0,1], in the trunk's
        precision; float32 CPU outputs, one per batch."""
        outs = []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(self.device)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                outs.append(fn(x).float().cpu().contiguous())
        return outs

    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) float images in [0,1] -> (N, F) float32 features (on CPU)."""
        outs = self._forward(self.model, images, batch_size)
        return torch.cat(outs) if outs else torch.zeros(0, self.feature_dim)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if hasattr(m, "feature_maps"):  # hub trunks (encoders.hub) built with pool="maps"
            return m.feature_maps(x)
        if hasattr(m, "forward_features"):  # timm models: everything before global pooling
            return m.forward_features(x)
        if hasattr(m, "layer4"):  # torchvision ResNets
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        raise ConfigError(f"backbone {self.name!r} does not expose feature maps; use cmer.apply: pixel")

    def feature_maps(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) float images in [0,1] -> (N, F, h, w) float32 maps before global pooling (on CPU).

        Their average over (h, w) is what `__call__` returns."""
        return torch.cat(self._forward(self._maps, images, batch_size))

    def masked_features(self, images: torch.Tensor, masks: torch.Tensor, apply: str = "pixel",
                        batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of images and of each masked variant: (N, 3, H, W), masks (M, 1, H, W) or (N, M, 1, H, W)
        -> (orig (N, F), masked (N, M, F)).

        apply="pixel": the trunk sees the masked images (one pass per variant). apply="feature": one pass per
        image; the mask removes the region's cells from the global average pool (`masked_average_pool`),
        so the trunk never sees the artificial edges a pixel mask creates.
        """
        if apply == "feature":
            maps = self.feature_maps(images, batch_size)
            return maps.mean((-2, -1)), masked_average_pool(maps, masks)
        if apply != "pixel":
            raise ConfigError(f"cmer.apply={apply!r}; expected 'pixel' or 'feature'")
        b = images.shape[0]
        m = masks.shape[-4]
        variants = images.unsqueeze(1) * masks.to(images.dtype)  # (N, M, 3, H, W)
        feats = self(torch.cat([images, variants.flatten(0, 1)]), batch_size)  # one batched pass
        return feats[:b], feats[b:].view(b, m, -1)


def feature_cache_key(**parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def dataset_fingerprint(dataset) -> str:
    """Identity of a dataset's images: for file-backed datasets the paths plus sizes and mtimes (a changed file
    invalidates the cache), for in-memory ones (packed files) a hash of the pixels."""
    h = hashlib.sha1()
    images = getattr(dataset, "images", None)
    if images is not None:
        h.update(repr(images.shape).encode())
        h.update(np.ascontiguousarray(images).data)
        return h.hexdigest()[:20]
    paths = dataset.paths if hasattr(dataset, "paths") else dataset
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:20]


def load_images(dataset, rows: Sequence[int], size: int) -> torch.Tensor:
    """(R, 3, size, size) uint8 images of `rows` of a CaptionedDataset (files or a packed file alike)."""
    arr = dataset.image_array(np.asarray(rows, dtype=np.int64), size)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def to_trunk_size(x: torch.Tensor, trunk_size: int | None) -> torch.Tensor:
    """(B, 3, S, S) float images resized (bilinear) to the frozen trunk's input size; unchanged if equal/None."""
    if trunk_size is None or x.shape[-1] == trunk_size:
        return x
    return F.interpolate(x, size=(trunk_size, trunk_size), mode="bilinear", align_corners=False)


def trunk_feature_spec(trunk: str, size: int, trunk_size: int | None, n_regions: int, mode: str,
                       soft_value: float, apply: str, key_parts: dict | None = None) -> dict:
    """What frozen-trunk features of masked variants depend on (besides the pixels and the precision); the key
    under which a packed file stores them. `key_parts`: the trunk's non-default settings (`Trunk.key_parts`, or
    `encoders.trunk_key_parts(**encoders.trunk_settings(cfg.model, apply))` without building it); none for a
    default trunk, whose spec stays as it was."""
    return {"trunk": trunk, "size": int(size), "trunk_size": int(trunk_size or size), "m": int(n_regions),
            "mode": mode, "soft": float(soft_value) if mode == "soft" else None, "apply": apply, **(key_parts or {})}


def stored_trunk_features(dataset, spec: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(orig (N, F), masked (N, M, F)) float32 stored in a packed file for `spec`, or None."""
    stored = (getattr(dataset, "meta", None) or {}).get("trunk_features") or {}
    hit = stored.get(json.dumps(spec, sort_keys=True))
    if hit is None:
        return None
    return hit[0].astype(np.float32), hit[1].astype(np.float32)


def _trunk_pass(dataset, size: int, tsize: int, batch_size: int, progress: ProgressFn | None,
                features: Callable[[torch.Tensor], tuple]) -> list[np.ndarray]:
    """`features` ((B, 3, T, T) float images -> a tuple of (B, ...) tensors) over every image of `dataset`, read in
    batches at `size` and resized to `tsize`; each output concatenated over the dataset."""
    parts, n = None, len(dataset)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        out = features(to_trunk_size(to_float(load_images(dataset, rows, size)), tsize))
        parts = [[] for _ in out] if parts is None else parts
        for part, o in zip(parts, out):
            part.append(o.numpy())
        if progress:
            progress("trunk features", min(start + batch_size, n), n)
    return [np.concatenate(p) for p in parts]


def cached_mask_features(dataset, trunk: Trunk, size: int, n_regions: int, mode: str,
                         soft_value: float, batch_size: int = 32, progress: ProgressFn | None = None,
                         use_cache: bool = True, apply: str = "pixel",
                         trunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trunk features of each image of `dataset` and of each of its M masked variants (`apply`: see
    `Trunk.masked_features`). Images are read at `size` and resized to `trunk_size` (default: `size`)
    before the trunk; masks are laid on the trunk's input.

    Returns (orig (N, F), masked (N, M, F)) float32. Cached by dataset fingerprint + settings; the cache
    file is written atomically, so an interrupted computation leaves nothing behind.
    """
    tsize = trunk_size or size
    parts = dict(data=dataset_fingerprint(dataset), size=size, trunk=trunk.name, precision=trunk.precision,
                 m=n_regions, mode=mode, soft=soft_value if mode == "soft" else None)
    if apply != "pixel":  # pixel-mode keys stay as they were: existing caches remain valid
        parts["apply"] = apply
    if tsize != size:
        parts["trunk_size"] = tsize
    parts.update(trunk.key_parts)  # pretrained, weights, cifar_stem, pool where not the default's
    key = feature_cache_key(**parts)
    path = cache_dir("features") / f"{key}.npz"
    if use_cache and path.is_file():
        with np.load(path) as z:
            return z["orig"], z["masked"]
    masks = grid_masks(tsize, tsize, n_regions, mode=mode, soft_value=soft_value)
    orig, masked = _trunk_pass(dataset, size, tsize, batch_size, progress,
                               lambda imgs: trunk.masked_features(imgs, masks, apply))
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, orig=orig, masked=masked)
    return orig, masked


def cached_trunk_features(dataset, trunk: Trunk, size: int, batch_size: int = 32, progress: ProgressFn | None = None,
                          use_cache: bool = True, trunk_size: int | None = None) -> np.ndarray:
    """(N, F) float32 trunk features of each image of `dataset`, no masked variants (one trunk pass per image: the
    runs whose methods need no CMER). Cached as `cached_mask_features` is, under a key of its own."""
    tsize = trunk_size or size
    parts = dict(data=dataset_fingerprint(dataset), size=size, trunk=trunk.name, precision=trunk.precision,
                 trunk_size=tsize, masked=False, **trunk.key_parts)
    path = cache_dir("features") / f"{feature_cache_key(**parts)}.npy"
    if use_cache and path.is_file():
        return np.load(path)
    (orig,) = _trunk_pass(dataset, size, tsize, batch_size, progress, lambda imgs: (trunk(imgs),))
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, orig)
    return orig


def augmented_view_features(images: torch.Tensor, mask_index: np.ndarray | None, trunk: Trunk, size: int,
                            n_regions: int, mode: str, soft_value: float, n_views: int, seed: int,
                            batch_size: int = 32, progress: ProgressFn | None = None,
                            apply: str = "pixel") -> np.ndarray:
    """(N, V, F) trunk features of V SimCLR-augmented views of each of the (N, 3, S, S) uint8 `images`.

    With `mask_index` (N,) the image is masked with that region (CMER's choice); -1 or None = no mask.
    apply="pixel" masks the image before augmenting it; apply="feature" augments image and mask together
    (same crop and flip) and drops the masked region from the pool of the view's feature maps.
    """
    from torchvision import tv_tensors

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchvision v2 draws from the global generator
    aug = simclr_augment(size)
    masks = grid_masks(size, size, n_regions, mode=mode, soft_value=soft_value)
    out = []
    n = len(images)
    try:
        for start in range(0, n, batch_size):
            imgs = to_float(images[start : start + batch_size])
            chosen = None
            if mask_index is not None:
                idx = torch.as_tensor(mask_index[start : start + batch_size])
                chosen = masks[idx.clamp(min=0)]  # (b, 1, H, W)
                chosen[idx < 0] = 1.0
            if chosen is not None and apply == "feature":
                pairs = [[aug(tv_tensors.Image(im), tv_tensors.Mask(mk)) for im, mk in zip(imgs, chosen)]
                         for _ in range(n_views)]  # (V, b) pairs of (view, its mask)
                views = torch.stack([torch.stack([p[0] for p in row]) for row in pairs], dim=1)
                view_masks = torch.stack([torch.stack([p[1] for p in row]) for row in pairs], dim=1)
                maps = trunk.feature_maps(views.flatten(0, 1).as_subclass(torch.Tensor))
                feats = masked_average_pool(maps, view_masks.flatten(0, 1).as_subclass(torch.Tensor).unsqueeze(1))
                feats = feats.view(len(imgs), n_views, -1)
            else:
                if chosen is not None:
                    imgs = imgs * chosen
                views = torch.stack([torch.stack([aug(im) for im in imgs]) for _ in range(n_views)], dim=1)
                feats = trunk(views.flatten(0, 1)).view(len(imgs), n_views, -1)
            out.append(feats.numpy())
            if progress:
                progress("augmented views", min(start + batch_size, n), n)
    finally:
        torch.random.set_rng_state(torch_state)  # leave the caller's RNG stream untouched
    return np.concatenate(out)
