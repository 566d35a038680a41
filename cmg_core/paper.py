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

L_global with end-to-end training (ssd+le, cmg): a memory bank of every training image's embedding combined
with neighbour-aware batches (see cmg_core.paper_e2).

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

Modules: this one holds `PaperRun` (data, text, E1, CMER + RID, the whole run) and `train_paper_run`;
`paper_augment` the batched SimCLR augmentation, `paper_models` the networks, `paper_e2` the E2 stage
(mixed into `PaperRun`), `paper_predict` `PaperPredictor`. Their public names are re-exported here.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import distributed as D
from .config import RunConfig, save_config
from .data import load_dataset, make_task
from .encoders import TextEncoder
from .errors import ConfigError
from .features import images_to_tensor, to_float
from .losses import duplicate_caption_mask, image_text_contrastive_loss, matching_score
from .masks import apply_masks, grid_masks
from .models import RID
from .paper_augment import batch_simclr_augment
from .paper_e2 import PaperE2Mixin
from .paper_models import _save, build_e1
from .pipeline import _check_resume, caption_tensor, finish_run, mark_stopped
from .runs import RunWriter, write_csv
from .stages import mean_caption_embedding, rid_predict, train_rid
from .utils import resolve_device, seed_everything

# re-exported: these names lived in this module before it was split
from .paper_models import E1Image, E1Pair, _backbone, _E2Train, build_e2, nt_xent_ids  # noqa: F401
from .paper_predict import PaperPredictor, _to_pil  # noqa: F401

Progress = Callable[[str, int, int], None]


# --- bookkeeping on rank 0 only ------------------------------------------------------------------------

class _NullWriter:
    """RunWriter stand-in for ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *a, **k: None


class PaperRun(PaperE2Mixin):
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

    def _optimizer_and_resume(self, model: nn.Module, weights: nn.Module, stage_cfg, ckpt: Path, stage: str,
                              method: str | None, label: str):
        """AdamW + cosine schedule + AMP scaler for a stage; resumed from `ckpt` when it exists (weights into
        `weights`). History records after the checkpoint's epoch are dropped. Returns (opt, sched, scaler, start)."""
        opt = torch.optim.AdamW(model.parameters(), lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(stage_cfg.epochs, 1))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        start = 0
        if self._exists(ckpt):
            state = torch.load(ckpt, map_location=self.device, weights_only=False)
            weights.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start = int(state["epoch"])
            self.log(f"{label}: resuming after epoch {start}")
        self.w.clear_history(stage, method, after_epoch=start)  # records after the checkpoint are re-run
        return opt, sched, scaler, start

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
        opt, sched, scaler, start = self._optimizer_and_resume(model, model, cfg.e1, ckpt, "e1", None, "E1")
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
                finish_run(self, results, t0)
        except BaseException as exc:
            if self.main:
                mark_stopped(self, exc)
            D.cleanup(self.dist, wait=False)
            raise
        D.cleanup(self.dist)
        return self.run_dir


def train_paper_run(cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Train every method of `cfg` with the paper profile and write the run folder; returns its path.

    Under torchrun every process calls this; rank 0 writes the run folder.
    """
    return PaperRun(cfg, progress=progress, overwrite=overwrite).run()
