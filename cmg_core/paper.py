"""One training run, `paper` profile: ResNets trained end to end on images, as in the paper (meant for a GPU).

Same straight line and the same run folder as the `cpu` profile (pipeline.py), so the app and the CLI read
both alike; only the networks differ:

* data: every image of the task is decoded once into a uint8 tensor (R, 3, S, S) kept on the device; SimCLR
  augmentations (random resized crop, flip, colour jitter, grayscale; the ranges of
  `features.simclr_augment`) are drawn per image and applied to whole batches on the device
  (`batch_simclr_augment`: one `grid_sample` + vectorised colour ops), so no data-loader workers are needed
  (`train.num_workers` is unused).
* E1 (Eq.1): a ResNet (`model.backbone`, from scratch unless `model.backbone_weights: imagenet`) + ImageHead,
  trained with `image_text_contrastive_loss` against TextProjection(frozen caption embeddings) on augmented
  images; one random caption per image and step.
* CMER (Eq.2): E1 in eval mode scores the original and all M masked variants of a batch of images in ONE
  pass (B * (M + 1) images); label l = argmax over variants of the matching score averaged (or maxed, per
  `cmer.caption_reduce`) over the image's captions.
* RID (Eq.3): `stages.train_rid` on E1's frozen backbone features of the masked variants + the original
  (the same pass as CMER). `models/rid.pt` holds the RID weights AND the E1 backbone it reads, so it can
  score new images on its own (`PaperPredictor`).
* E2: a fresh ResNet (`models.E2Encoder`) per method, NT-Xent (`e2.temperature`) on two augmented views of
  the CMER-masked image (ER methods) or of the raw image; + lambda * L_global (CMLE, Eq.13) for ssd+le and
  cmg; + `e2.mse_weight` * MSE distillation to the mean caption embedding for cmg-mse (as the cpu profile).
* Detector: MahalanobisDetector on E2's h (or z, `detector.features`) of the un-augmented images, RID-masked
  for ER methods (train rows too), exactly as the cpu profile.

L_global with end-to-end training (ssd+le, cmg). The cpu profile recomputes all N embeddings every step,
which a ResNet cannot afford. Here BOTH of the usual remedies are combined, because each alone is biased:

* a memory bank of every training image's current embedding h of its un-augmented (masked) image,
  detached. It is filled by a full pass at the start of every epoch (train-mode BatchNorm like the training
  batches, running statistics restored afterwards; also why a resumed epoch needs no saved bank), and every
  step overwrites the rows of the batch's images with their fresh embeddings (all ranks' batches under
  torchrun). A bank alone would give gradients through the anchor only, never through its neighbours.
* neighbour-aware batches: each step takes a few seed images from the shuffled (sharded) training set and
  fills the batch with their LLE neighbours (`cmle.neighbour_batch_indices`, cut at the batch size), so
  most neighbours of the seeds are in the batch WITH gradients. Every batch member's term of Eq.13 is used:
  its in-batch neighbours enter with gradients, the others through the bank
  (`lle_reconstruction_loss(h_batch, W[batch], bank with the batch's rows replaced by h_batch)`).
  An epoch is as many steps as a plain epoch (about N images seen), so all methods cost the same per epoch;
  the seeds of an epoch are the first (steps * seeds per step) of its shuffled shard.
  With `cmle.normalize` (default) h is L2-normalised for L_global and in the bank.

Optimisation: AdamW (`lr`, `weight_decay` of the stage) with a cosine learning-rate schedule over the
stage's epochs; mixed precision (torch.autocast float16 + GradScaler) on CUDA when `train.amp`. The final
epoch's weights are kept (per-epoch test AUROC in history.jsonl is for plots only, `train.eval_every_epoch`).

Resume: E1 and every E2 method write a checkpoint (model, optimizer, scheduler, GradScaler, epoch) to
checkpoints/ every `train.checkpoint_every` epochs and after the last; finished stages are in models/ (and
their checkpoint is then deleted: with ResNet-50 each is ~0.3 GB). A new `cmg train` on the same run folder
continues from them (history records after the checkpoint are dropped).

Multi-GPU: under torchrun (WORLD_SIZE > 1, see cmg_core.distributed) the E1 and E2 loops shard the training
images with a DistributedSampler (drop_last: shards are disjoint) and wrap the model in
DistributedDataParallel (BatchNorm -> SyncBatchNorm on CUDA). `e1.batch_size` / `e2.batch_size` are GLOBAL
batches (each rank takes batch_size / world_size). The contrastive losses (Eq.1, NT-Xent) are computed over
the batch gathered from all ranks (`distributed.all_gather_rows`, each rank's own rows keep their
gradients; the loss is scaled by world_size so DDP's gradient average equals the exact gradient of the
global-batch loss); in NT-Xent the same image on two ranks (a neighbour in two neighbour-aware batches) is
not counted as a negative. CMER, RID, per-epoch evaluation, the detector and every file are handled by
rank 0; results the other ranks need (labels, caption embeddings, LLE weights) are broadcast. Checkpoints are
read by every rank from the run folder (single node or a shared file system).
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .cmle import cmle_weights, fit_caption_clusters, neighbour_batch_indices
from .config import RunConfig, save_config
from .data import load_dataset, make_task
from .data.images import open_image
from .detector import MahalanobisDetector
from .encoders import Normalize, TextEncoder, build_backbone
from .errors import ConfigError, DataError
from .features import images_to_tensor, masked_variants, to_float
from .losses import (duplicate_caption_mask, image_text_contrastive_loss, lle_reconstruction_loss, matching_score,
                     mse_distillation_loss, nt_xent_loss)
from .masks import apply_masks, grid_masks
from .metrics import detection_metrics
from .models import RID, E2Encoder, ImageHead, TextProjection
from .pipeline import USES_ER, USES_LE, USES_MSE, _check_resume, caption_tensor
from .runs import Run, RunWriter, method_slug, write_csv, write_json, write_npy
from .stages import mean_caption_embedding, rid_predict, train_rid
from .utils import atomic_path, resolve_device, seed_everything

Progress = Callable[[str, int, int], None]


# --- batched SimCLR augmentation --------------------------------------------------------------------

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


# --- networks -----------------------------------------------------------------------------------------

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


# --- bookkeeping on rank 0 only ------------------------------------------------------------------------

class _NullWriter:
    """RunWriter stand-in for ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class PaperRun:
    """State of one paper-profile run while it trains; `run()` is the whole straight line."""

    def __init__(self, cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False):
        if cfg.model.profile != "paper":
            raise ConfigError(f"PaperRun runs model.profile=paper, got {cfg.model.profile!r}")
        self.cfg = cfg
        self.dist = D.init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.main = self.rank == 0
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt = self.run_dir / "checkpoints"
        self.models = self.run_dir / "models"
        self._progress_cb = progress
        error = None
        if self.main:
            try:
                _check_resume(self.run_dir, cfg, overwrite)
                self.w = RunWriter(self.run_dir)
            except ConfigError as exc:
                error = str(exc)
        else:
            self.w = _NullWriter()
        error = D.broadcast_object(error)
        if error is not None:
            D.cleanup(self.dist)
            raise ConfigError(error)

    # --- bookkeeping ------------------------------------------------------------------------------
    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.main:
            self.w.progress(stage, done, total, message)
            if self._progress_cb:
                self._progress_cb(stage, done, total)

    def log(self, msg: str) -> None:
        self.w.log(msg)

    def _stage_seed(self, k: int) -> int:
        return self.cfg.train.seed * 1000 + k

    def _exists(self, path: Path) -> bool:
        """Rank 0's view of whether a file exists (every rank takes the same decision)."""
        return bool(D.broadcast_object(path.is_file() if self.main else None))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def _to_device(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def _ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    def _sync_bn(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _sampler(self, n: int, seed: int):
        from torch.utils.data import DistributedSampler

        return DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=self.world > 1)

    def _log_shards(self, stage: str, epoch: int, shard: list[int]) -> None:
        shards = D.all_gather_object([int(i) for i in shard])
        if self.world > 1:
            self.log(f"shards {stage} epoch {epoch}: " + json.dumps({str(r): s for r, s in enumerate(shards)}))

    def _epoch_done(self, label: str, total: int, rec: dict) -> None:
        self.w.history(**rec)
        self.progress(label + (f" ({rec['method']})" if rec.get("method") else ""), rec["epoch"], total,
                      " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)))

    def _want_checkpoint(self, epoch: int, total: int) -> bool:
        every = max(int(self.cfg.train.checkpoint_every), 1)
        return epoch % every == 0 or epoch == total

    # --- data -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.device = D.device_for(resolve_device(cfg.train.device), self.dist)
        self.amp = bool(cfg.train.amp) and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.main:  # rank 0 first: generating a dataset cache is not safe to do concurrently
            self.ds = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
        D.barrier()
        if not self.main:
            self.ds = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
        self.task = make_task(self.ds, cfg.task.normal_classes, cfg.task.n_normal, cfg.task.seed, cfg.task.holdout)
        t = self.task
        self.rows = np.concatenate([t.train_idx, t.test_idx])
        self.n_train = len(t.train_idx)
        self.is_anomaly = np.concatenate([np.zeros(self.n_train, int), t.test_is_anomaly])
        self.roles = np.array(["train"] * self.n_train + ["test"] * len(t.test_idx))
        if self.main:
            save_config(cfg, self.run_dir / "config.yaml")
            self.w.update_info(name=cfg.name, status="running", created=time.time(), profile=cfg.model.profile,
                               methods=list(cfg.train.methods), dataset={"name": cfg.data.name, "root": cfg.data.root},
                               class_names=self.ds.class_names, normal_classes=list(t.normal_classes),
                               n_regions=cfg.cmer.n_regions, mask=cfg.cmer.mask, image_size=cfg.data.image_size,
                               device=str(self.device), world_size=self.world, host=platform.node(), error=None)
            items = [self.ds[i] for i in self.rows]
            write_csv(self.run_dir / "images.csv", pd.DataFrame({
                "row": np.arange(len(self.rows)), "index": self.rows, "image_id": [it.image_id for it in items],
                "path": [str(it.path) for it in items], "class_id": [it.class_id for it in items],
                "class_name": [it.class_name for it in items], "role": self.roles, "is_anomaly": self.is_anomaly,
                "captions": [" | ".join(it.captions) for it in items]}))
            self.log(f"task: {t.describe(self.ds)}; device {self.device}; {self.world} process(es); "
                     f"backbone {cfg.model.backbone}; amp {self.amp}")
        self.progress("images", 0, 1)
        s = cfg.data.image_size
        self.images = images_to_tensor([self.ds[i].path for i in self.rows], s).to(self.device)  # (R, 3, S, S) uint8
        self.masks = grid_masks(s, s, cfg.cmer.n_regions, cfg.cmer.mask, cfg.cmer.soft_value).to(self.device)
        self.progress("images", 1, 1)

    def text(self) -> None:
        self.progress("text embeddings", 0, 1)
        caps = None
        if self.main:
            enc = TextEncoder(self.cfg.model.text_model, device=str(self.device))
            caps = caption_tensor(self.ds, self.rows, enc)
            del enc
        self.captions = D.broadcast_object(caps).float()  # (R, C, T) on CPU
        self.caption_mean = mean_caption_embedding(self.captions)
        self.progress("text embeddings", 1, 1)

    def _batch(self, idx: torch.Tensor, masks: np.ndarray | None = None) -> torch.Tensor:
        """Float images of rows `idx`, multiplied by masks[index] per row when given."""
        x = to_float(self.images[idx.to(self.device)])
        if masks is not None:
            x = x * self.masks[torch.as_tensor(masks[idx.cpu().numpy()], device=self.device)]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # --- E1 ---------------------------------------------------------------------------------------
    def e1(self) -> None:
        cfg, n = self.cfg, self.n_train
        final, ckpt = self.models / "e1.pt", self.ckpt / "e1.pt"
        torch.manual_seed(self._stage_seed(1))
        model, self.feature_dim = build_e1(cfg, self.captions.shape[-1])
        model = self._to_device(model)
        if self._exists(final):
            model.load_state_dict(torch.load(final, map_location=self.device, weights_only=False)["model"])
            self.e1_model = model.eval()
            return
        model = self._sync_bn(model)
        ddp = self._ddp(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.e1.lr, weight_decay=cfg.e1.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.e1.epochs, 1))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        start = 0
        if self._exists(ckpt):
            state = torch.load(ckpt, map_location=self.device, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start = int(state["epoch"])
            self.w.clear_history("e1", None, after_epoch=start)  # records after the checkpoint are re-run
            self.log(f"E1: resuming after epoch {start}")
        else:
            self.w.clear_history("e1")
        sampler = self._sampler(n, self._stage_seed(1))
        per_rank = max(2, cfg.e1.batch_size // self.world)
        c = self.captions.shape[1]
        caps_train = self.captions[:n].to(self.device)
        for epoch in range(start, cfg.e1.epochs):
            sampler.set_epoch(epoch)
            shard = list(sampler)
            if epoch == start:
                self._log_shards("e1", epoch + 1, shard)
            gen = torch.Generator().manual_seed(self._stage_seed(1) * 7919 + epoch * self.world + self.rank)
            ddp.train()
            total, steps = 0.0, 0
            for s in range(0, len(shard), per_rank):
                idx = torch.tensor(shard[s : s + per_rank])
                if len(idx) < 2:
                    continue
                x = batch_simclr_augment(self._batch(idx), gen)
                pick = torch.randint(c, (len(idx),), generator=gen).to(self.device)
                txt_raw = caps_train[idx.to(self.device), pick]
                with self._autocast():
                    img, txt = ddp(x, txt_raw)
                img_all, _ = D.all_gather_rows(img.float(), keep_grad=True)
                txt_all, _ = D.all_gather_rows(txt.float(), keep_grad=True)
                raw_all, _ = D.all_gather_rows(txt_raw)
                mask = duplicate_caption_mask(raw_all) if cfg.e1.dedupe_captions else None
                loss = image_text_contrastive_loss(img_all, txt_all, cfg.e1.temperature, symmetric=cfg.e1.symmetric,
                                                   positive_mask=mask)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss * self.world).backward()
                scaler.step(opt)
                scaler.update()
                total, steps = total + loss.item(), steps + 1
            sched.step()
            if self.main and self._want_checkpoint(epoch + 1, cfg.e1.epochs):
                _save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}, ckpt)
            self._epoch_done("E1", cfg.e1.epochs, {"stage": "e1", "method": None, "epoch": epoch + 1,
                                                   "loss": total / max(steps, 1)})
        if self.main:
            _save({"model": model.state_dict(), "feature_dim": self.feature_dim, "backbone": cfg.model.backbone}, final)
            ckpt.unlink(missing_ok=True)  # models/e1.pt supersedes it (a ResNet-50 + AdamW checkpoint is ~0.3 GB)
        D.barrier()
        self.e1_model = model.eval()

    # --- CMER + RID (rank 0; results broadcast) ----------------------------------------------------
    @torch.no_grad()
    def _e1_pass(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """One batched pass per B images over the originals + all M masked variants (B * (M + 1) images):
        Eq.2 scores (R, M), E1 backbone features of the originals (R, F) and of the variants (R, M, F)."""
        cfg, model = self.cfg, self.e1_model.eval()
        m, r = cfg.cmer.n_regions, len(self.rows)
        bs = max(1, cfg.e1.batch_size)
        scores, orig, masked = [], [], []
        for s in range(0, r, bs):
            idx = torch.arange(s, min(s + bs, r))
            x = self._batch(idx)
            variants = apply_masks(x, self.masks)  # (b, M, 3, S, S)
            with self._autocast():
                feats, emb = model.image(torch.cat([x, variants.flatten(0, 1)]))
                txt = model.text(self.captions[idx].to(self.device))  # (b, C, D)
            b = len(idx)
            feats, emb, txt = feats.float(), emb.float(), txt.float()
            sims = matching_score(emb[b:].view(b, m, 1, -1), txt.unsqueeze(1))  # (b, M, C)
            scores.append((sims.mean(-1) if cfg.cmer.caption_reduce == "mean" else sims.max(-1).values).cpu())
            orig.append(feats[:b].cpu())
            masked.append(feats[b:].view(b, m, -1).cpu())
            self.progress("CMER", min(s + bs, r), r)
        return torch.cat(scores).numpy(), torch.cat(orig), torch.cat(masked)

    def cmer_and_rid(self) -> None:
        out = None
        if self.main:
            out = self._cmer_and_rid_main()
        self.e1_scores, self.cmer_label, self.rid_probs = D.broadcast_object(out)
        self.rid_choice = self.rid_probs.argmax(1)

    def _cmer_and_rid_main(self):
        cfg, n = self.cfg, self.n_train
        e1_scores, orig, masked = self._e1_pass()
        cmer_label = e1_scores.argmax(1)
        m = cfg.cmer.n_regions
        self.log(f"CMER labels on training images: {np.bincount(cmer_label[:n], minlength=m).tolist()} (M={m})")
        path = self.models / "rid.pt"
        rid = RID(masked.shape[-1], tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
        if path.is_file():
            rid.load_state_dict(torch.load(path, weights_only=False)["rid"])
        else:
            gen = np.random.default_rng(self._stage_seed(2))
            val = np.zeros(n, bool)
            val[gen.permutation(n)[: int(round(cfg.cmer.rid_val_fraction * n))]] = True
            self.w.clear_history("rid")
            rid = train_rid(masked[:n], orig[:n], torch.from_numpy(cmer_label[:n]).long(), torch.from_numpy(val),
                            cfg.cmer, self._stage_seed(2),
                            on_epoch=lambda rec: self._epoch_done("RID", cfg.cmer.rid_epochs, rec))
            backbone = {k: v.cpu() for k, v in self.e1_model.image.state_dict().items() if not k.startswith("head.")}
            _save({"rid": rid.state_dict(), "e1_image": backbone, "feature_dim": masked.shape[-1],
                   "backbone": cfg.model.backbone}, path)
        rid_probs = rid_predict(rid, masked, orig).numpy()
        rid_choice = rid_probs.argmax(1)
        cols = {f"e1_score_{j}": e1_scores[:, j] for j in range(m)}
        cols.update({f"rid_prob_{j}": rid_probs[:, j] for j in range(m)})
        write_csv(self.run_dir / "cmer.csv", pd.DataFrame({
            "row": np.arange(len(self.rows)), "role": self.roles, **cols, "cmer_label": cmer_label,
            "rid_choice": rid_choice, "agree": (cmer_label == rid_choice).astype(int)}))
        return e1_scores, cmer_label, rid_probs

    # --- E2 ---------------------------------------------------------------------------------------
    def _lle_weights(self):
        if getattr(self, "_w", None) is None:
            out = None
            if self.main:
                cfg = self.cfg
                emb = self.caption_mean[: self.n_train].numpy().astype(np.float64)
                k = cfg.cmle.n_clusters
                if k > len(emb):
                    out = f"cmle.n_clusters={k} is larger than the {len(emb)} normal training images"
                else:
                    labels, _ = fit_caption_clusters(emb, k, cfg.cmle.covariance_type, seed=self._stage_seed(4))
                    out = cmle_weights(emb, labels, cfg.cmle.n_neighbors, cfg.cmle.reg)
                    self.log(f"CMLE: GMM cluster sizes {np.bincount(labels, minlength=k).tolist()}")
            out = D.broadcast_object(out)
            if isinstance(out, str):
                raise ConfigError(out)
            self._w = out.tocsr()
        return self._w

    @torch.no_grad()
    def embed(self, enc: E2Encoder, rows: np.ndarray, masks: np.ndarray | None, batch_size: int = 256) -> np.ndarray:
        """E2 features (h, or z with detector.features=projection) of the un-augmented images of `rows`."""
        enc.eval()
        out = []
        for s in range(0, len(rows), batch_size):
            x = self._batch(torch.as_tensor(rows[s : s + batch_size]), masks)
            with self._autocast():
                h, z = enc(x)
            out.append((z if self.cfg.detector.features == "projection" else h).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def _fill_bank(self, enc: E2Encoder, masks: np.ndarray | None, normalize: bool, batch_size: int) -> torch.Tensor:
        """(N, F) h of every training image, train-mode BatchNorm (as in the training batches); BatchNorm
        running statistics are restored afterwards. Every rank computes all rows in the same chunks."""
        saved = {k: v.clone() for k, v in enc.named_buffers()}
        enc.train()
        parts = []
        for s in range(0, self.n_train, batch_size):
            idx = torch.arange(s, min(s + batch_size, self.n_train))
            with self._autocast():
                h, _ = enc(self._batch(idx, masks))
            h = h.float()
            parts.append(F.normalize(h, dim=-1) if normalize else h)
        for k, v in enc.named_buffers():
            v.copy_(saved[k])
        return torch.cat(parts)

    @staticmethod
    def _e2_batches(shard: list[int], per_rank: int, w, n_seed: int) -> list[np.ndarray]:
        """Index batches of one epoch for this rank: plain chunks of the shard, or neighbour-aware batches
        (seeds from the shard + their LLE neighbours, cut at per_rank) when `w` is given."""
        if w is None:
            return [np.asarray(shard[s : s + per_rank]) for s in range(0, len(shard), per_rank)
                    if len(shard[s : s + per_rank]) >= 2]
        steps = math.ceil(len(shard) / per_rank)
        out = []
        for s in range(steps):
            seeds = np.asarray([shard[(s * n_seed + j) % len(shard)] for j in range(n_seed)])
            out.append(neighbour_batch_indices(w, seeds, max_size=per_rank))
        return out

    def train_method(self, method: str) -> dict | None:
        cfg, n, slug = self.cfg, self.n_train, method_slug(method)
        final, ckpt = self.models / f"{slug}.pt", self.ckpt / f"e2_{slug}.pt"
        er, le, mse = USES_ER[method], USES_LE[method], USES_MSE[method]
        train_masks = self.cmer_label if er else None
        eval_masks = self.rid_choice if er else None
        text_dim = self.captions.shape[-1] if mse else None
        torch.manual_seed(self._stage_seed(5))
        enc = self._to_device(build_e2(cfg, text_dim))
        all_rows = np.arange(len(self.rows))
        test = slice(n, None)
        if self._exists(final):
            if not self.main:
                return None
            state = torch.load(final, map_location=self.device, weights_only=False)
            enc.load_state_dict(state["model"])
            det = MahalanobisDetector.from_state_dict(state["detector"])
            h = self.embed(enc, all_rows, eval_masks)
        else:
            self._train_e2(enc, method, ckpt, train_masks, eval_masks, le, mse)
            if not self.main:
                D.barrier()
                return None
            h = self.embed(enc, all_rows, eval_masks)
            det = MahalanobisDetector(cfg.detector.n_clusters, cfg.detector.covariance, seed=cfg.train.seed).fit(h[:n])
            _save({"model": {k: v.cpu() for k, v in enc.state_dict().items()}, "detector": det.state_dict(),
                   "method": method, "text_dim": text_dim, "uses_er": er, "feature_dim": enc.projection[0].in_features,
                   "backbone": cfg.model.backbone, "cifar_stem": cfg.model.cifar_stem}, final)
            ckpt.unlink(missing_ok=True)  # the final model supersedes the resume checkpoint
            D.barrier()
        write_npy(self.run_dir / "embeddings" / f"{slug}.npy", h.astype(np.float32))
        scores = det.score(h)
        metrics = detection_metrics(self.is_anomaly[test], scores[test])
        self.log(f"{method}: AUROC {metrics['auroc']:.2f} AUPR {metrics['aupr']:.2f} FPR95 {metrics['fpr95']:.2f}")
        return {"scores": scores, "metrics": metrics}

    def _train_e2(self, enc: E2Encoder, method: str, ckpt: Path, train_masks, eval_masks, le: bool, mse: bool) -> None:
        cfg, n = self.cfg, self.n_train
        model = self._sync_bn(_E2Train(enc))
        enc = model.enc
        ddp = self._ddp(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.e2.lr, weight_decay=cfg.e2.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.e2.epochs, 1))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        start = 0
        if self._exists(ckpt):
            state = torch.load(ckpt, map_location=self.device, weights_only=False)
            enc.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start = int(state["epoch"])
            self.w.clear_history("e2", method, after_epoch=start)  # records after the checkpoint are re-run
            self.log(f"E2 ({method}): resuming after epoch {start}")
        else:
            self.w.clear_history("e2", method)
        w = self._lle_weights() if le else None
        per_rank = max(2, cfg.e2.batch_size // self.world)
        n_seed = 0
        if w is not None:
            k_mean = w.getnnz() / max(w.shape[0], 1)
            n_seed = int(min(per_rank, max(2, round(per_rank / (1.0 + k_mean)))))
        normalize = bool(cfg.cmle.normalize)
        targets = self.caption_mean[:n].to(self.device) if mse else None
        sampler = self._sampler(n, self._stage_seed(5))
        for epoch in range(start, cfg.e2.epochs):
            sampler.set_epoch(epoch)
            shard = list(sampler)
            if epoch == start:
                self._log_shards(f"e2 {method}", epoch + 1, shard)
            gen = torch.Generator().manual_seed(self._stage_seed(5) * 7919 + epoch * self.world + self.rank)
            bank = self._fill_bank(enc, train_masks, normalize, per_rank) if w is not None else None
            ddp.train()
            sums = torch.zeros(4, dtype=torch.float64)  # loss, simclr, global, mse
            steps = 0
            for idx_np in self._e2_batches(shard, per_rank, w, n_seed):
                idx = torch.from_numpy(np.asarray(idx_np, dtype=np.int64))
                b = len(idx)
                clean = self._batch(idx, train_masks)
                v1, v2 = batch_simclr_augment(clean, gen), batch_simclr_augment(clean, gen)
                need_clean = w is not None or mse
                x = torch.cat([v1, v2, clean] if need_clean else [v1, v2])
                with self._autocast():
                    h, z, t = ddp(x)
                z = z.float()
                if self.world > 1:
                    z1, off = D.all_gather_rows(z[:b], keep_grad=True)
                    z2, _ = D.all_gather_rows(z[b : 2 * b], keep_grad=True)
                    ids, _ = D.all_gather_rows(idx.to(z.device))
                    loss_simclr = nt_xent_ids(z1, z2, ids, cfg.e2.temperature)
                else:
                    loss_simclr = nt_xent_loss(z[:b], z[b : 2 * b], cfg.e2.temperature)
                loss = loss_simclr * self.world
                lg = lm = torch.zeros((), device=z.device)
                if w is not None:
                    hc = h[2 * b :].float()
                    hn = F.normalize(hc, dim=-1) if normalize else hc
                    idx_dev = idx.to(self.device)
                    w_rows = torch.from_numpy(w[idx_np].toarray()).float().to(self.device)
                    lg = lle_reconstruction_loss(hn, w_rows, bank.index_copy(0, idx_dev, hn))
                    loss = loss + cfg.cmle.weight * lg
                if mse:
                    lm = mse_distillation_loss(t[2 * b :].float(), targets[idx.to(self.device)])
                    loss = loss + cfg.e2.mse_weight * lm
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if w is not None:  # refresh the bank with every rank's fresh embeddings
                    all_idx, _ = D.all_gather_rows(idx_dev)
                    all_h, _ = D.all_gather_rows(hn.detach())
                    bank.index_copy_(0, all_idx, all_h)
                total = loss_simclr.item() + cfg.cmle.weight * lg.item() + cfg.e2.mse_weight * lm.item()
                sums += torch.tensor([total, loss_simclr.item(), lg.item(), lm.item()], dtype=torch.float64)
                steps += 1
            sched.step()
            sums = D.all_reduce_mean(sums / max(steps, 1))
            rec = {"stage": "e2", "method": method, "epoch": epoch + 1,
                   **{k: float(v) for k, v in zip(("loss", "simclr", "global", "mse"), sums.tolist())}}
            if self.main:
                if cfg.train.eval_every_epoch:  # plots only: never used to pick the model
                    h_all = self.embed(enc, np.arange(len(self.rows)), eval_masks)
                    d = MahalanobisDetector(cfg.detector.n_clusters, cfg.detector.covariance,
                                            seed=cfg.train.seed).fit(h_all[:n])
                    rec["auroc"] = detection_metrics(self.is_anomaly[n:], d.score(h_all[n:]))["auroc"]
                if self._want_checkpoint(epoch + 1, cfg.e2.epochs):
                    _save({"epoch": epoch + 1, "model": enc.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "method": method}, ckpt)
            self._epoch_done("E2", cfg.e2.epochs, rec)
        enc.eval()

    # --- the whole run ----------------------------------------------------------------------------
    def run(self) -> Path:
        t0 = time.time()
        try:
            self.prepare()
            self.text()
            self.e1()
            self.cmer_and_rid()
            results = {}
            for i, method in enumerate(self.cfg.train.methods):
                self.progress("methods", i, len(self.cfg.train.methods), method)
                results[method] = self.train_method(method)
            if self.main:
                write_csv(self.run_dir / "scores.csv", pd.DataFrame(
                    {"row": np.arange(len(self.rows)), "role": self.roles, "is_anomaly": self.is_anomaly,
                     **{f"score_{m}": r["scores"] for m, r in results.items()}}))
                write_json(self.run_dir / "metrics.json", {m: r["metrics"] for m, r in results.items()})
                self.w.update_info(status="done", finished=time.time(), wall_time_s=time.time() - t0)
                self.progress("done", 1, 1)
                self.log(f"done in {time.time() - t0:.1f} s")
        except BaseException as exc:
            if self.main:
                self.w.update_info(status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                                   error=f"{exc.__class__.__name__}: {exc}")
                self.log(f"stopped: {exc.__class__.__name__}: {exc}")
            D.cleanup(self.dist, wait=False)
            raise
        D.cleanup(self.dist)
        return self.run_dir


def train_paper_run(cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Train every method of `cfg` with the paper profile and write the run folder; returns its path.

    Under torchrun every process calls this; rank 0 writes the run folder.
    """
    return PaperRun(cfg, progress=progress, overwrite=overwrite).run()


# --- scoring new images with a finished paper-profile run ------------------------------------------

def _to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


class PaperPredictor:
    """A finished paper-profile run's E1 backbone + RID, E2 encoders and detectors, ready to score images.

    Same interface as predict.Predictor: `methods`, `explain_many`, `explain`, `score`.
    """

    def __init__(self, run: Run, e1_image: E1Image, rid: RID, encoders: dict, detectors: dict, cfg: RunConfig,
                 device: torch.device):
        self.run, self.e1_image, self.rid, self.encoders, self.detectors = run, e1_image, rid, encoders, detectors
        self.cfg, self.device = cfg, device
        self.image_size, self.n_regions = cfg.data.image_size, cfg.cmer.n_regions
        self.mask, self.soft_value = cfg.cmer.mask, cfg.cmer.soft_value

    @property
    def methods(self) -> list[str]:
        return list(self.encoders)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "PaperPredictor":
        run = Run.open(run_dir)
        if run.status != "done":
            raise DataError(f"run {run.path} is not finished (status: {run.status}); wait for it or pick another run")
        cfg = run.config()
        dev = resolve_device(device)
        models = run.path / "models"
        state = torch.load(models / "rid.pt", map_location="cpu", weights_only=False)
        backbone, spec = _backbone(cfg)
        e1_image = E1Image(backbone, spec, cfg.model.head_hidden, cfg.model.embed_dim)
        missing, unexpected = e1_image.load_state_dict({k: v.float() for k, v in state["e1_image"].items()},
                                                       strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise DataError(f"{models / 'rid.pt'} does not match the run's E1 backbone "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        rid = RID(int(state["feature_dim"]), tuple(cfg.cmer.rid_hidden), dropout=cfg.cmer.rid_dropout)
        rid.load_state_dict({k: v.float() for k, v in state["rid"].items()})
        encs, dets = {}, {}
        for method in run.methods:
            st = torch.load(models / f"{method_slug(method)}.pt", map_location="cpu", weights_only=False)
            enc = build_e2(cfg, st.get("text_dim"))
            enc.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in st["model"].items()})
            encs[method] = enc.to(dev).eval()
            dets[method] = MahalanobisDetector.from_state_dict(st["detector"])
        return cls(run, e1_image.to(dev).eval(), rid.eval(), encs, dets, cfg, dev)

    @torch.no_grad()
    def explain_many(self, images: list) -> list[dict]:
        """PIL images, paths or file objects -> one result dict per image (see predict.Predictor.explain)."""
        from PIL import Image

        pils = [img if isinstance(img, Image.Image) else open_image(img) for img in images]
        x = to_float(images_to_tensor(pils, self.image_size))  # (B, 3, S, S)
        variants = masked_variants(x, self.n_regions, self.mask, self.soft_value)  # (B, M, 3, S, S)
        b, m = variants.shape[:2]
        feats = self.e1_image.features(torch.cat([x, variants.flatten(0, 1)]).to(self.device)).float().cpu()
        orig, masked = feats[:b], feats[b:].view(b, m, -1)
        probs = rid_predict(self.rid, masked, orig).numpy()
        choice = probs.argmax(1)
        per_method = {}
        for method, enc in self.encoders.items():
            inp = variants[torch.arange(b), torch.from_numpy(choice)] if USES_ER[method] else x
            h, z = enc(inp.to(self.device))
            f = (z if self.cfg.detector.features == "projection" else h).float().cpu().numpy()
            det = self.detectors[method]
            s = det.score(f)
            per_method[method] = (s, det.percentile(s), float(np.percentile(det.train_scores_, 95)))
        out = []
        for i in range(b):
            out.append({
                "variants": [_to_pil(v) for v in variants[i]],
                "rid_probs": probs[i],
                "rid_choice": int(choice[i]),
                "masked_image": _to_pil(variants[i, choice[i]]),
                "image": _to_pil(x[i]),
                "scores": {k: float(v[0][i]) for k, v in per_method.items()},
                "percentiles": {k: float(v[1][i]) for k, v in per_method.items()},
                "thresholds": {k: v[2] for k, v in per_method.items()},
            })
        return out

    def explain(self, image) -> dict:
        return self.explain_many([image])[0]

    def score(self, images: list, method: str = "cmg") -> np.ndarray:
        if method not in self.encoders:
            raise DataError(f"run {self.run.path} has no method {method!r}; it has {self.methods}")
        return np.array([r["scores"][method] for r in self.explain_many(images)])
