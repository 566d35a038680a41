"""Feature backend `end2end`: encoders trained end to end on the task's images (meant for a GPU; small CNNs fit
a CPU).

Every image of the task is held once as uint8 (R, 3, S, S) on the device (`Devices.hold`); SimCLR views are drawn
per image and made for whole batches on the device (`nets.batch_simclr_augment`). On CUDA the training passes
run under bf16 autocast with channels_last tensors (`train.amp`); the features that are scored (E2's `embed`,
E1's CMER pass) are computed in fp32, so a run's scores and thresholds do not depend on the device's precision
and the Predictor reproduces them on a CPU or a GPU.

* `End2EndE1` (`e1.encoder: end2end`): backbone + ImageHead trained with Eq.1 on augmented images; CMER scores
  the original and all M masked variants in one pass; RID reads E1's backbone features.
* `End2EndE2`: a fresh backbone per method. Every method draws the same shuffled batches and the same
  augmentations (one generator per epoch), so NT-Xent sees the same negatives in every method. L_global
  (`cmg[lle]`) reconstructs E2's features of the batch's images from a memory bank of every training image's
  features, each step's batch rows replaced by their fresh (gradient-carrying) features and written back
  detached. With `e2.guidance_on: clean` the features are of the un-augmented images (in the same forward)
  and the bank is refilled in eval mode at the start of each epoch; with `views` they are the two views' own
  features (no extra images; a bank row is the mean of an image's two views) and the bank is filled in eval
  mode once, then kept current by the shuffled batches. `cmg[supcon]` uses the batch's caption-cluster
  labels on the two views; cmg-mse maps the same features as L_global to the text space.

Multi-GPU (torchrun): DistributedSampler shards (drop_last, disjoint), DDP (SyncBatchNorm on CUDA), the
contrastive losses over the batch gathered from all ranks (scaled by world_size: DDP averages gradients).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed as D
from ..artifacts import load_model, model_path
from ..losses import duplicate_caption_mask, image_text_contrastive_loss, matching_score
from ..masks import apply_masks
from ..models import E2Encoder
from .frozen import make_optimizer
from ..runs import method_slug
from .context import StageContext
from .nets import E2Train, batch_simclr_augment, bn_train_copy, build_e1, build_e2
from ..methods import MethodSpec
from .objective import Guidance, e2_step_loss


def make_schedule(opt, stage_cfg):
    """Cosine over the stage's epochs (`schedule: cosine`) or a constant learning rate (`constant`)."""
    if getattr(stage_cfg, "schedule", "cosine") == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(stage_cfg.epochs, 1))


def _augment(cfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    e2 = cfg.e2
    return batch_simclr_augment(x, gen, crop_scale=tuple(e2.crop_scale), vflip=e2.vflip)


def _resume(ctx: StageContext, ckpt, weights, opt, sched, label: str, stage: str, method: str | None) -> int:
    start = 0
    if ctx.io.exists(ckpt):
        state = torch.load(ckpt, map_location=ctx.dev.device, weights_only=True)
        weights.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
        ctx.io.log(f"{label}: resuming after epoch {start}")
    ctx.io.clear_history(stage, method, start)  # records after the checkpoint are re-run
    return start


class End2EndE1:
    """E1 trained end to end on images (Eq.1); its backbone features are RID's input. captions: (R, C, T)
    caption embeddings of every row."""

    def __init__(self, ctx: StageContext, captions: torch.Tensor):
        self.ctx, self.captions = ctx, captions

    def train_and_score(self):
        ctx, cfg = self.ctx, self.ctx.cfg
        final, ckpt = model_path(ctx.io.models, "e1"), ctx.io.ckpt / "e1.pt"
        torch.manual_seed(ctx.stage_seed(1))
        model, _ = build_e1(cfg, self.captions.shape[-1])
        model = ctx.dev.to_device(model)
        if ctx.io.exists(final):
            model.load_state_dict(load_model(final)[0])
        else:
            self._train(model, ckpt)
            ctx.io.save_model(final, model.state_dict(), encoder="end2end")
            ctx.io.drop_checkpoint("e1")  # models/e1.npz supersedes it
            D.barrier()
        self.model = model.eval()
        return self._pass()

    def _train(self, model, ckpt) -> None:
        ctx, cfg, n = self.ctx, self.ctx.cfg, self.ctx.n_train
        model = ctx.dev.sync_bn(model)
        ddp = ctx.dev.ddp(model)
        opt = make_optimizer(model.parameters(), cfg.e1)
        sched = make_schedule(opt, cfg.e1)
        start = _resume(ctx, ckpt, model, opt, sched, "E1", "e1", None)
        sampler = ctx.dev.sampler(n, ctx.stage_seed(1))
        per_rank = max(2, cfg.e1.batch_size // ctx.dev.world)
        c = self.captions.shape[1]
        caps = self.captions[:n].to(ctx.dev.device)
        for epoch in range(start, cfg.e1.epochs):
            sampler.set_epoch(epoch)
            shard = list(sampler)
            if epoch == start:
                ctx.dev.log_shards("e1", epoch + 1, shard)
            gen = torch.Generator().manual_seed(ctx.stage_seed(1) * 7919 + epoch * ctx.dev.world + ctx.dev.rank)
            ddp.train()
            total, steps = 0.0, 0
            for s in range(0, len(shard), per_rank):
                idx = torch.tensor(shard[s : s + per_rank])
                if len(idx) < 2:
                    continue
                x = _augment(cfg, ctx.dev.batch(idx), gen)
                pick = torch.randint(c, (len(idx),), generator=gen).to(ctx.dev.device)
                txt_raw = caps[idx.to(ctx.dev.device), pick]
                with ctx.dev.autocast():
                    img, txt = ddp(x, txt_raw)
                img_all, _ = D.all_gather_rows(img.float(), keep_grad=True)
                txt_all, _ = D.all_gather_rows(txt.float(), keep_grad=True)
                raw_all, _ = D.all_gather_rows(txt_raw)
                mask = duplicate_caption_mask(raw_all) if cfg.e1.dedupe_captions else None
                loss = image_text_contrastive_loss(img_all, txt_all, cfg.e1.temperature, symmetric=cfg.e1.symmetric,
                                                   positive_mask=mask, exclude_positive=cfg.e1.exclude_positive)
                opt.zero_grad(set_to_none=True)
                (loss * ctx.dev.world).backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
            sched.step()
            if ctx.dev.main and ctx.io.want_checkpoint(epoch + 1, cfg.e1.epochs):
                ctx.io.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict()}, ckpt)
            ctx.io.epoch_cb(cfg.e1.epochs, "E1")({"stage": "e1", "method": None, "epoch": epoch + 1,
                                               "loss": total / max(steps, 1)})

    @torch.no_grad()
    def _pass(self):
        """One batched pass per B images over the originals + all M masked variants (B * (M + 1) images):
        Eq.2 scores (R, M), E1 backbone features of the originals (R, F) and of the variants (R, M, F)."""
        ctx, cfg, model = self.ctx, self.ctx.cfg, self.model
        m, r = cfg.cmer.n_regions, len(ctx.rows)
        bs = max(1, cfg.e1.batch_size)
        scores, orig, masked = [], [], []
        for s in range(0, r, bs):
            idx = torch.arange(s, min(s + bs, r))
            x = ctx.dev.batch(idx)
            variants = apply_masks(x, ctx.dev.masks)  # (b, M, 3, S, S)
            # fp32, no autocast: RID learns from these features and the Predictor recomputes them on any device
            feats, emb = model.image(torch.cat([x, variants.flatten(0, 1)]))
            txt = model.text(self.captions[idx].to(ctx.dev.device))  # (b, C, D)
            b = len(idx)
            feats, emb, txt = feats.float(), emb.float(), txt.float()
            sims = matching_score(emb[b:].view(b, m, 1, -1), txt.unsqueeze(1))  # (b, M, C)
            scores.append((sims.mean(-1) if cfg.cmer.caption_reduce == "mean" else sims.max(-1).values).cpu())
            orig.append(feats[:b].cpu())
            masked.append(feats[b:].view(b, m, -1).cpu())
            ctx.io.progress("CMER", min(s + bs, r), r)
        return torch.cat(scores).numpy(), torch.cat(orig), torch.cat(masked)


class End2EndE2:
    """E2 = a backbone + projection trained end to end per method. cmer_label: (R,) CMER's mask of every row (None
    when no method masks); items_per_image: how often an epoch passes each training image."""

    def __init__(self, ctx: StageContext, cmer_label: np.ndarray | None = None, items_per_image: int = 1):
        self.ctx, self.cmer_label, self.items_per_image = ctx, cmer_label, items_per_image

    def build(self, text_dim: int | None) -> E2Encoder:
        torch.manual_seed(self.ctx.stage_seed(5))
        return self.ctx.dev.to_device(build_e2(self.ctx.cfg, text_dim))

    @torch.no_grad()
    def embed(self, enc: E2Encoder, spec: MethodSpec, rows: np.ndarray | None = None, masks: np.ndarray | None = None,
              bn: str = "eval", batch_size: int = 256) -> np.ndarray:
        """E2 features (h, or z with detector.features=projection) of the un-augmented images of `rows` (default:
        all), each masked by masks[row] ((R,) mask indices, -1 = unmasked; None = no masks). bn `train`:
        BatchNorm normalises each batch by its own statistics (a copy of the encoder: its running statistics are
        left alone), batches of e2.batch_size in the order of `rows`."""
        ctx = self.ctx
        rows = np.arange(len(ctx.rows)) if rows is None else np.asarray(rows)
        if bn == "train":
            enc, batch_size = bn_train_copy(enc), max(2, ctx.cfg.e2.batch_size)
        else:
            enc.eval()
        out = []
        for s in range(0, len(rows), batch_size):
            x = ctx.dev.batch(torch.as_tensor(rows[s : s + batch_size]), masks)
            h, z = enc(x)  # fp32, no autocast: the detector's features do not depend on the device's precision
            out.append((z if ctx.cfg.detector.features == "projection" else h).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def _fill_bank(self, enc: E2Encoder, masks, normalize: bool) -> torch.Tensor:
        """(N, H) features of every training image in eval mode (BatchNorm running statistics, as scored)."""
        was_training = enc.training
        enc.eval()
        parts = []
        for s in range(0, self.ctx.n_train, 256):
            idx = torch.arange(s, min(s + 256, self.ctx.n_train))
            with self.ctx.dev.autocast():
                h, _ = enc(self.ctx.dev.batch(idx, masks))
            parts.append(F.normalize(h.float(), dim=-1) if normalize else h.float())
        enc.train(was_training)
        return torch.cat(parts)

    def _mix(self, v: torch.Tensor, idx: torch.Tensor, g: Guidance, gen: torch.Generator) -> torch.Tensor:
        from ..cmda import draw_partners, mix

        partner, w = draw_partners(g.mix_partners, g.mix_weights, idx, gen)
        return mix(v, _augment(self.ctx.cfg, self.ctx.dev.batch(partner), gen), w.to(v.device))

    def train(self, spec: MethodSpec, g: Guidance, evaluate) -> E2Encoder:
        ctx, cfg, n = self.ctx, self.ctx.cfg, self.ctx.n_train
        e2 = ctx.e2_config(spec)
        enc = self.build(g.head_dim or None)
        model = ctx.dev.sync_bn(E2Train(enc))
        enc = model.enc
        ddp = ctx.dev.ddp(model)
        opt = make_optimizer(model.parameters(), e2)
        sched = make_schedule(opt, e2)
        ckpt = ctx.io.ckpt / f"e2_{method_slug(spec.name)}.pt"
        start = _resume(ctx, ckpt, enc, opt, sched, f"E2 ({spec.name})", "e2", spec.name)
        g.to(ctx.dev.device)
        train_masks = self.cmer_label if spec.er else None  # E2 trains on CMER's choice
        per_rank = max(2, e2.batch_size // ctx.dev.world)
        reps = self.items_per_image  # protocol.train_items: captions -> one item per caption, as released
        sampler = ctx.dev.sampler(n * reps, ctx.stage_seed(5))
        lle = g.lle_weights is not None
        on_views = g.needs_features and e2.guidance_on == "views"
        bank = None
        for epoch in range(start, e2.epochs):
            sampler.set_epoch(epoch)
            shard = [i % n for i in sampler]
            if epoch == start:
                ctx.dev.log_shards(f"e2 {spec.name}", epoch + 1, shard)
            gen = torch.Generator().manual_seed(ctx.stage_seed(5) * 7919 + epoch * ctx.dev.world + ctx.dev.rank)
            mix_gen = torch.Generator().manual_seed(ctx.stage_seed(5) * 7919 + epoch * ctx.dev.world + ctx.dev.rank
                                                    + 104729)
            if lle and (bank is None or not on_views):  # views: once, then kept current by the batches
                bank = self._fill_bank(enc, train_masks, g.normalize)
            ddp.train()
            sums, steps = {}, 0
            for s in range(0, len(shard), per_rank):
                idx = torch.tensor(shard[s : s + per_rank])
                if len(idx) < 2:
                    continue
                b = len(idx)
                clean = ctx.dev.batch(idx, train_masks)
                v1, v2 = _augment(cfg, clean, gen), _augment(cfg, clean, gen)
                if g.mix_partners is not None:  # cmda: each view mixed in pixel space with a partner's view
                    v1, v2 = (self._mix(v, idx, g, mix_gen) for v in (v1, v2))
                extra = g.needs_features and not on_views
                x = torch.cat([v1, v2, clean] if extra else [v1, v2])
                with ctx.dev.autocast():
                    h, z, t = ddp(x)
                z = z.float()
                z1, _ = D.all_gather_rows(z[:b], keep_grad=True)
                z2, _ = D.all_gather_rows(z[b : 2 * b], keep_grad=True)
                ids, _ = D.all_gather_rows(idx.to(ctx.dev.device))
                idx_dev = idx.to(ctx.dev.device)
                # the rows the guidance acts on: the clean images (b) or both views (2b, each image twice)
                rows = slice(0, 2 * b) if on_views else slice(2 * b, 3 * b)
                g_idx = torch.cat([idx, idx]) if on_views else idx
                h_g = h[rows].float() if g.needs_features else None
                bank_b = None
                if lle:
                    hn = F.normalize(h_g, dim=-1) if g.normalize else h_g
                    if on_views:  # one bank row per image: the mean of its two views
                        hn = hn[:b] + hn[b:]
                        hn = F.normalize(hn, dim=-1) if g.normalize else hn / 2
                    bank_b = bank.index_copy(0, idx_dev, hn)
                text = t[rows].float() if g.head_dim else None
                loss, parts = e2_step_loss(g, ids, z1, z2, e2.temperature, h_clean=h_g, bank=bank_b,
                                           text_pred=text, local_idx=g_idx, contrast_scale=ctx.dev.world)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if lle:  # every rank's fresh features into the bank
                    all_idx, _ = D.all_gather_rows(idx_dev)
                    all_h, _ = D.all_gather_rows(hn.detach())
                    bank.index_copy_(0, all_idx, all_h)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
            sched.step()
            keys = ("loss", "simclr", "global", "mse", "ce")
            mean = D.all_reduce_mean(torch.tensor([sums.get(k, 0.0) / max(steps, 1) for k in keys],
                                                  dtype=torch.float64))
            rec = {"stage": "e2", "method": spec.name, "epoch": epoch + 1,
                   **{k: float(v) for k, v in zip(keys, mean.tolist())}}
            if ctx.dev.main:
                if evaluate is not None:
                    rec.update(evaluate(enc, epoch + 1))
                if ctx.io.want_checkpoint(epoch + 1, e2.epochs):
                    ctx.io.save({"epoch": epoch + 1, "model": enc.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict()}, ckpt)
            ctx.io.epoch_cb(e2.epochs, "E2")(rec)
        enc.eval()
        return enc
