"""Feature backend `frozen`: a frozen pretrained trunk whose features are computed once and cached.

* `FrozenE1` - trunk features of every image and of each masked variant (cached on disk, shared by every
  task and run); E1 is a trainable head on them (Eq.1) and scores the masked variants (Eq.2). Its features
  are also RID's input. Used by the `frozen` profile, and by the `end2end` profile when `e1.encoder: frozen`
  (the default: CMER's labels then do not come from a network trained on a few hundred images).
* `HeadE2` - E2 of the `frozen` profile: an MLP head on cached trunk features of augmented views; every step
  recomputes the features of all N training images, so L_global's neighbours are current (exact Eq.13).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import load_model, model_path
from ..config import mask_apply
from ..encoders import trunk_key_parts, trunk_settings
from ..features import (Trunk, augmented_view_features, cached_mask_features, cached_trunk_features, load_images,
                        stored_trunk_features, trunk_feature_spec)
from ..models import E2Head, ImageHead, TextProjection
from ..runs import method_slug, write_npy
from ..stages import E1Model, batches, feature_views, restore, snapshot, e2_features, train_e1
from ..utils import resolve_trunk_precision
from ..methods import MethodSpec
from .nets import bn_train_copy
from .context import StageContext
from .records import VIEW_CACHES
from .objective import Guidance, e2_step_loss


def build_trunk(cfg, device) -> Trunk:
    """The run's frozen trunk on `device` (`encoders.trunk_settings`: hub trunks pool feature maps for
    cmer.apply: feature). Built once per process for the same settings, precision, device and weights files (a
    fit and the Predictor it returns share it): the trunk is frozen, so sharing it changes nothing."""
    settings = trunk_settings(cfg.model, mask_apply(cfg))
    return _shared_trunk(json.dumps(settings, sort_keys=True), resolve_trunk_precision(cfg.model.trunk_precision,
                         device), str(device), json.dumps(trunk_key_parts(**settings), sort_keys=True))


@functools.lru_cache(maxsize=2)
def _shared_trunk(settings: str, precision: str, device: str, identity: str) -> Trunk:
    """`Trunk.build` of JSON `settings`; `identity` (the weights files' identity) is part of the cache key only."""
    return Trunk.build(device=torch.device(device), precision=precision, **json.loads(settings))


class TrunkFeatures:
    """The frozen trunk's features of every row: orig (R, F) and, when a method needs CMER, its masked variants
    (R, M, F) (cached on disk, or read from a packed file that stores them)."""

    def __init__(self, ctx: StageContext, masked: bool = True):
        self.ctx = ctx
        cfg, io = ctx.cfg, ctx.io
        self.masked = None
        spec = trunk_feature_spec(cfg.model.trunk, cfg.data.image_size, cfg.model.trunk_image_size,
                                  cfg.cmer.n_regions, cfg.cmer.mask, cfg.cmer.soft_value, ctx.mask_apply,
                                  key_parts=trunk_key_parts(**trunk_settings(cfg.model, ctx.mask_apply)))
        stored = stored_trunk_features(ctx.ds, spec)
        if stored is not None:  # a packed file carries them: no trunk (nor its weights) needed
            orig, variants = stored
            io.log("trunk features: read from the packed file (stored in float16)")
        elif masked:
            orig, variants = cached_mask_features(ctx.ds, self.trunk, cfg.data.image_size, cfg.cmer.n_regions,
                                                  cfg.cmer.mask, cfg.cmer.soft_value, progress=io.progress,
                                                  apply=ctx.mask_apply, trunk_size=cfg.model.trunk_image_size)
        else:
            orig, variants = cached_trunk_features(ctx.ds, self.trunk, cfg.data.image_size, progress=io.progress,
                                                   trunk_size=cfg.model.trunk_image_size), None
        self.orig = torch.from_numpy(orig[ctx.rows])  # (R, F)
        if masked:
            self.masked = torch.from_numpy(variants[ctx.rows])  # (R, M, F)
        io.log(f"trunk features: {tuple(self.orig.shape)} images" +
                (f", {tuple(self.masked.shape)} masked variants" if masked else ""))

    @property
    def trunk(self) -> Trunk:
        """The run's trunk, built on first use only (features read from a cache or packed file need none)."""
        return build_trunk(self.ctx.cfg, self.ctx.dev.device)


class FrozenE1:
    """E1 head on frozen-trunk features (`TrunkFeatures` with masked variants); the features double as RID's
    input. captions: (R, C, T) caption embeddings of every row."""

    def __init__(self, ctx: StageContext, feats: TrunkFeatures, captions: torch.Tensor):
        self.ctx, self.orig, self.masked, self.captions = ctx, feats.orig, feats.masked, captions

    def _model(self) -> E1Model:
        cfg = self.ctx.cfg
        return E1Model(ImageHead(self.orig.shape[1], cfg.model.head_hidden, cfg.model.embed_dim),
                       TextProjection(self.captions.shape[-1], cfg.model.text_hidden, cfg.model.embed_dim))

    def train_and_score(self):
        """Train (or load) E1 and return (Eq.2 scores (R, M), RID inputs orig (R, F), masked (R, M, F))."""
        ctx, cfg, n, io = self.ctx, self.ctx.cfg, self.ctx.n_train, self.ctx.io
        path = model_path(io.models, "e1")
        if path.is_file():
            e1, weights = self._model(), load_model(path)[0]
            for part in ("image", "text"):
                getattr(e1, part).load_state_dict({k[len(part) + 1:]: v for k, v in weights.items()
                                                   if k.startswith(part + ".")})
        else:
            state, save = io.checkpoint("e1", "e1")
            e1 = train_e1(self.orig[:n], self.captions[:n], cfg.e1, cfg.model, ctx.stage_seed(1),
                          on_epoch=io.epoch_cb(cfg.e1.epochs, "E1"), state=state, on_checkpoint=save)
            io.save_model(path, {**{f"image.{k}": v for k, v in e1.image.state_dict().items()},
                                  **{f"text.{k}": v for k, v in e1.text.state_dict().items()}}, encoder="frozen")
            io.drop_checkpoint("e1")  # superseded by the final model
        self.model = e1  # cmda picks its mixing partners with it
        scores = e1.score(self.masked, self.captions, cfg.cmer.caption_reduce).numpy()
        return scores, self.orig, self.masked


class HeadE2:
    """E2 = MLP head on frozen-trunk features (the `frozen` profile). cmer_label: (R,) CMER's mask of every row
    (None when no method masks); items_per_image: how often an epoch passes each training image."""

    def __init__(self, ctx: StageContext, feats: TrunkFeatures, cmer_label: np.ndarray | None = None,
                 items_per_image: int = 1):
        self.ctx, self.feats, self.cmer_label, self.items_per_image = ctx, feats, cmer_label, items_per_image

    def _views(self, er: bool) -> torch.Tensor:
        ctx, cfg, n = self.ctx, self.ctx.cfg, self.ctx.n_train
        path = ctx.io.ckpt / VIEW_CACHES[0 if er else 1]
        if path.is_file():
            return torch.from_numpy(np.load(path))
        images = load_images(ctx.ds, ctx.rows[:n], cfg.data.image_size)
        views = augmented_view_features(images, self.cmer_label[:n] if er else None, self.feats.trunk,
                                        cfg.data.image_size, cfg.cmer.n_regions, cfg.cmer.mask, cfg.cmer.soft_value,
                                        cfg.e2.n_views, ctx.stage_seed(3), progress=ctx.io.progress,
                                        apply=ctx.mask_apply)
        write_npy(path, views)
        return torch.from_numpy(views)

    def features(self, masks: np.ndarray | None) -> torch.Tensor:
        """(R, F) trunk features E2 sees for each row: the variant masked by masks[row] ((R,) mask indices, -1 =
        unmasked; None = no masks), else the original."""
        if masks is None:
            return self.feats.orig
        m = torch.from_numpy(np.asarray(masks))
        picked = self.feats.masked[torch.arange(len(m)), m.clamp(min=0)]
        return torch.where((m >= 0).unsqueeze(1), picked, self.feats.orig)

    def build(self, text_dim: int | None) -> E2Head:
        cfg = self.ctx.cfg
        return E2Head(self.feats.orig.shape[1], cfg.model.head_hidden, cfg.model.embed_dim, text_dim)

    @torch.no_grad()
    def embed(self, head: E2Head, spec: MethodSpec, rows: np.ndarray | None = None, masks: np.ndarray | None = None,
              bn: str = "eval") -> np.ndarray:
        """(len(rows), H) E2 features of `rows` (default: all) under `masks` (see `features`); bn `train`: batches
        of e2.batch_size normalised by their own statistics (end2end.End2EndE2.embed)."""
        feats = self.features(masks)
        feats = feats if rows is None else feats[torch.as_tensor(np.asarray(rows))]
        if bn != "train":
            return e2_features(head, feats)
        clone, b = bn_train_copy(head), max(2, self.ctx.cfg.e2.batch_size)
        return torch.cat([clone(feats[s : s + b])[0] for s in range(0, len(feats), b)]).numpy()

    def train(self, spec: MethodSpec, g: Guidance, evaluate) -> E2Head:
        """NT-Xent on cached augmented feature views (+ the method's guidance), final-epoch head."""
        ctx, n, io = self.ctx, self.ctx.n_train, self.ctx.io
        e2 = ctx.e2_config(spec)
        clean = (self.feats.masked[torch.arange(n), torch.from_numpy(self.cmer_label[:n])] if spec.er
                 else self.feats.orig[:n])  # (N, F) E2 trains on CMER's choice
        views = self._views(spec.er)
        state, save = io.checkpoint(f"e2_{method_slug(spec.name)}", "e2", spec.name)
        torch.manual_seed(ctx.stage_seed(5))
        gen = torch.Generator().manual_seed(ctx.stage_seed(5))
        mix_gen = torch.Generator().manual_seed(ctx.stage_seed(5) + 1)  # cmda: partners and their views
        head = self.build(g.head_dim or None)
        opt = make_optimizer(head.parameters(), e2)
        start = restore(state, {"model": head}, opt, gen)
        for epoch in range(start, e2.epochs):
            head.train()
            sums, steps = {}, 0
            for item in batches(n * self.items_per_image, e2.batch_size, gen, drop_last=True):
                idx = item % n  # protocol.train_items: captions -> one item per caption
                if len(idx) < 2:
                    continue
                v1, v2 = feature_views(views, idx, e2, gen)  # the same draws for every method
                if g.mix_partners is not None:  # cmda: each view mixed with a view of a caption-matched partner
                    v1, v2 = (mix_views(v, views, idx, g, e2, mix_gen) for v in (v1, v2))
                h1, z1 = head(v1)
                h2, z2 = head(v2)
                h_clean = bank = text = None
                g_idx = idx
                if g.needs_features and e2.guidance_on == "views":  # both views, each image twice
                    h_clean, g_idx = torch.cat([h1, h2]), torch.cat([idx, idx])
                if g.lle_weights is not None:  # every step: all N clean features, so neighbours are current
                    h_all, _ = head(clean)
                    bank = F.normalize(h_all, dim=-1) if g.normalize else h_all
                    h_clean = h_all[idx] if h_clean is None else h_clean
                if g.head_dim:  # cmg-mse's text map, or she's classifier
                    h_clean = head(clean[idx])[0] if h_clean is None else h_clean
                    text = head.to_text(h_clean)
                loss, parts = e2_step_loss(g, idx, z1, z2, e2.temperature, h_clean=h_clean, bank=bank,
                                           text_pred=text, local_idx=g_idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
            rec = {"stage": "e2", "method": spec.name, "epoch": epoch + 1,
                   **{k: v / max(steps, 1) for k, v in sums.items()}}
            head.eval()
            if evaluate is not None:
                rec.update(evaluate(head, epoch + 1))
            save(epoch + 1, snapshot(epoch + 1, {"model": head}, opt, gen))  # before reporting: no epoch lost
            io.epoch_cb(e2.epochs, "E2")(rec)
        head.eval()
        return head


def make_optimizer(params, stage_cfg) -> torch.optim.Optimizer:
    """Adam or AdamW with the stage's lr, betas and weight decay (`e2.optimizer`, `e2.betas`)."""
    opt = getattr(stage_cfg, "optimizer", "adamw")
    betas = tuple(getattr(stage_cfg, "betas", (0.9, 0.999)))
    if opt == "adam":
        return torch.optim.Adam(params, lr=stage_cfg.lr, betas=betas, weight_decay=stage_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=stage_cfg.lr, betas=betas, weight_decay=stage_cfg.weight_decay)


def mix_views(v: torch.Tensor, views: torch.Tensor, idx: torch.Tensor, g: Guidance, e2, gen) -> torch.Tensor:
    """CMDA in the frozen profile: (1 - w) v + w (a feature view of a partner), partners drawn per row."""
    from ..cmda import draw_partners, mix

    partner, w = draw_partners(g.mix_partners, g.mix_weights, idx, gen)
    return mix(v, feature_views(views, partner, e2, gen)[0], w)
