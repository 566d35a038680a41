"""Training stages on feature tensors: E1 (Eq.1), CMER labels (Eq.2), RID (Eq.3), and E2's augmented feature
views and features (the E2 loop on them is `cmg_core.train.frozen.HeadE2`).

Each stage takes tensors, a config section and callbacks, and returns trained modules plus per-epoch
records; the pipeline (`cmg_core.train.run.Training`) decides where tensors come from and where results are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import CMERConfig, E1Config, E2Config, ModelConfig
from .losses import duplicate_caption_mask, image_text_contrastive_loss, matching_score, rid_accuracy, rid_loss
from .models import RID, E2Head, ImageHead, TextProjection

EpochFn = Callable[[dict], None]  # receives one history record per epoch
CheckpointFn = Callable[[int, dict], None]  # (epoch, state) -> persist


def batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = False):
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def snapshot(epoch: int, modules: dict, opt, gen: torch.Generator) -> dict:
    """Everything needed to continue training after `epoch`: weights, optimizer, both RNG states."""
    return {"epoch": epoch, **{k: m.state_dict() for k, m in modules.items()}, "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}


def restore(state: dict | None, modules: dict, opt, gen: torch.Generator) -> int:
    """Load a `snapshot` (if any) and return the epoch to continue from."""
    if not state:
        return 0
    for k, m in modules.items():
        m.load_state_dict(state[k])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


# --- E1 ----------------------------------------------------------------------------------------------

@dataclass
class E1Model:
    image: ImageHead
    text: TextProjection

    @torch.no_grad()
    def score(self, feats: torch.Tensor, captions: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Eq.2 matching scores. feats (N, M, F) masked-variant features, captions (N, C, T) -> (N, M)."""
        self.image.eval(), self.text.eval()
        img = self.image(feats)  # (N, M, D)
        txt = self.text(captions)  # (N, C, D)
        sims = matching_score(img.unsqueeze(2), txt.unsqueeze(1))  # (N, M, C)
        return sims.mean(-1) if reduce == "mean" else sims.max(-1).values


def train_e1(feats: torch.Tensor, captions: torch.Tensor, cfg: E1Config, model_cfg: ModelConfig, seed: int,
             on_epoch: EpochFn | None = None, state: dict | None = None,
             on_checkpoint: CheckpointFn | None = None) -> E1Model:
    """Eq.1: image head + text projection so each image matches its own captions.

    feats (N, F) trunk features; captions (N, C, T) frozen text embeddings (C captions per image; images with
    fewer captions repeat theirs). Each step pairs every image with one of its captions at random.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = E1Model(ImageHead(feats.shape[1], model_cfg.head_hidden, model_cfg.embed_dim),
                    TextProjection(captions.shape[-1], model_cfg.text_hidden, model_cfg.embed_dim))
    params = list(model.image.parameters()) + list(model.text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = restore(state, {"image": model.image, "text": model.text}, opt, gen)
    n, c = captions.shape[:2]
    for epoch in range(start, cfg.epochs):
        model.image.train(), model.text.train()
        total, steps = 0.0, 0
        for idx in batches(n, cfg.batch_size, gen, drop_last=True):
            if len(idx) < 2:
                continue
            pick = torch.randint(c, (len(idx),), generator=gen)
            txt_raw = captions[idx, pick]
            mask = duplicate_caption_mask(txt_raw) if cfg.dedupe_captions else None
            loss = image_text_contrastive_loss(model.image(feats[idx]), model.text(txt_raw), cfg.temperature,
                                               symmetric=cfg.symmetric, positive_mask=mask,
                                               exclude_positive=cfg.exclude_positive)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        if on_checkpoint:
            on_checkpoint(epoch + 1, snapshot(epoch + 1, {"image": model.image, "text": model.text}, opt, gen))
        if on_epoch:
            on_epoch({"stage": "e1", "method": None, "epoch": epoch + 1, "loss": total / max(steps, 1)})
    model.image.eval(), model.text.eval()
    return model


# --- RID ---------------------------------------------------------------------------------------------

def rid_validation(n: int, cfg: CMERConfig, seed: int) -> torch.Tensor:
    """(n,) bool: the training images RID holds out for its per-epoch validation accuracy (cmer.rid_val_fraction)."""
    gen = np.random.default_rng(seed)
    val = np.zeros(n, bool)
    val[gen.permutation(n)[: int(round(cfg.rid_val_fraction * n))]] = True
    return torch.from_numpy(val)


def train_rid(masked: torch.Tensor, orig: torch.Tensor, labels: torch.Tensor, val_mask: torch.Tensor,
              cfg: CMERConfig, seed: int, on_epoch: EpochFn | None = None, state: dict | None = None,
              on_checkpoint: CheckpointFn | None = None, on_model: Callable[[int, RID], None] | None = None) -> RID:
    """Eq.3: RID learns CMER's label l from the masked variants alone (no text).

    masked (N, M, F), orig (N, F), labels (N,), val_mask (N,) bool: held-out images for validation accuracy
    (reported per epoch, never used to choose the model: the final epoch's weights are kept). on_model(epoch, rid)
    sees the model in eval mode after each epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rid = RID(masked.shape[-1], tuple(cfg.rid_hidden), dropout=cfg.rid_dropout)
    opt = torch.optim.AdamW(rid.parameters(), lr=cfg.rid_lr, weight_decay=cfg.rid_weight_decay)
    start = restore(state, {"model": rid}, opt, gen)
    tr = torch.nonzero(~val_mask).flatten()
    va = torch.nonzero(val_mask).flatten()
    for epoch in range(start, cfg.rid_epochs):
        rid.train()
        total, steps = 0.0, 0
        for b in batches(len(tr), cfg.rid_batch_size, gen):
            idx = tr[b]
            loss = rid_loss(rid(masked[idx], orig[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        rid.eval()
        with torch.no_grad():
            rec = {"stage": "rid", "method": None, "epoch": epoch + 1, "loss": total / max(steps, 1),
                   "train_acc": rid_accuracy(rid(masked[tr], orig[tr]), labels[tr]),
                   "chance": 1.0 / masked.shape[1]}
            if len(va):
                rec["val_acc"] = rid_accuracy(rid(masked[va], orig[va]), labels[va])
        if on_checkpoint:
            on_checkpoint(epoch + 1, snapshot(epoch + 1, {"model": rid}, opt, gen))
        if on_epoch:
            on_epoch(rec)
        if on_model:
            on_model(epoch + 1, rid)
    rid.eval()
    return rid


def train_rid_selected_on(masked: torch.Tensor, orig: torch.Tensor, labels: torch.Tensor, n: int,
                          select: np.ndarray, cfg: CMERConfig, seed: int, val_mask: torch.Tensor) -> RID:
    """RID trained as `train_rid` on the first n rows of masked (R, M, F), orig (R, F), labels (R,), keeping the
    epoch whose accuracy on rows `select` is highest (the earliest on ties): the released code's checkpoint choice,
    made on the normal test images (a departure: protocol.rid_select: test)."""
    best = {"acc": -1.0, "state": None}
    sel = torch.as_tensor(np.asarray(select), dtype=torch.long)

    def keep(epoch: int, rid: RID) -> None:
        with torch.no_grad():
            acc = rid_accuracy(rid(masked[sel], orig[sel]), labels[sel]) if len(sel) else 0.0
        if acc > best["acc"]:
            best.update(acc=acc, state={k: v.clone() for k, v in rid.state_dict().items()})

    rid = train_rid(masked[:n], orig[:n], labels[:n], val_mask, cfg, seed, on_model=keep)
    if best["state"] is not None:
        rid.load_state_dict(best["state"])
    return rid.eval()


@torch.no_grad()
def rid_predict(rid: RID, masked: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """(N, M, F), (N, F) -> (N, M) probabilities over the masked variants."""
    rid.eval()
    return torch.softmax(rid(masked, orig), dim=-1)


# --- E2 ----------------------------------------------------------------------------------------------

def feature_views(views: torch.Tensor, idx: torch.Tensor, cfg: E2Config, gen: torch.Generator):
    """Two augmented feature views per sample: two different cached image augmentations + noise + dropout."""
    v = views.shape[1]
    a = torch.randint(v, (len(idx),), generator=gen)
    b = (a + 1 + torch.randint(max(v - 1, 1), (len(idx),), generator=gen)) % v if v > 1 else a
    out = []
    for pick in (a, b):
        x = views[idx, pick]
        if cfg.feature_noise > 0:
            x = x + cfg.feature_noise * x.std() * torch.randn(x.shape, generator=gen)
        if cfg.feature_dropout > 0:
            keep = (torch.rand(x.shape, generator=gen) > cfg.feature_dropout).float()
            x = x * keep / (1 - cfg.feature_dropout)
        out.append(x)
    return out


@torch.no_grad()
def e2_features(head: E2Head, feats: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """(N, F) trunk features -> (N, H) E2 features h (what the detector scores)."""
    head.eval()
    return torch.cat([head(feats[s : s + batch_size])[0] for s in range(0, len(feats), batch_size)]).numpy()


def mean_caption_embedding(captions: torch.Tensor) -> torch.Tensor:
    """(N, C, T) caption embeddings -> (N, T) L2-normalised mean per image (CMLE's clustering input)."""
    return F.normalize(captions.mean(1), dim=-1)
