"""E2 stage of a `paper`-profile run (see cmg_core.paper): `PaperE2Mixin`, mixed into `PaperRun`.

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

The mixin uses the run's state and helpers defined by `PaperRun` (cfg, device, amp, world, rank, main, w,
images, captions, caption_mean, cmer_label, rid_choice, _batch, _autocast, _to_device, _ddp, _sync_bn,
_sampler, _exists, _stage_seed, _log_shards, _epoch_done, _want_checkpoint, log).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as D
from .cmle import cmle_weights, fit_caption_clusters, neighbour_batch_indices
from .detector import MahalanobisDetector
from .errors import ConfigError
from .losses import lle_reconstruction_loss, mse_distillation_loss, nt_xent_loss
from .metrics import detection_metrics
from .models import E2Encoder
from .paper_augment import batch_simclr_augment
from .paper_models import _E2Train, _save, build_e2, nt_xent_ids
from .pipeline import USES_ER, USES_LE, USES_MSE
from .runs import method_slug, write_npy


class PaperE2Mixin:
    """E2 part of `PaperRun`: LLE weights, memory bank, neighbour-aware batches, training and scoring per method."""

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
        opt, sched, scaler, start = self._optimizer_and_resume(model, enc, cfg.e2, ckpt, "e2", method,
                                                               f"E2 ({method})")
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
