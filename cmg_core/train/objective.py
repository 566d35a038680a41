"""What each method trains E2 with, written once for both feature backends (method names: cmg_core.methods).

`Guidance` holds a method's extra targets (LLE weights, caption-cluster labels, MSE targets) and
`e2_step_loss` combines NT-Xent with them for one batch; the backends only decide how the embeddings of a
batch (and, for L_global, of the neighbours) are produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from ..cmda import cmda_partners
from ..cmle import batch_caption_clusters
from ..errors import ConfigError
from ..losses import lle_reconstruction_loss, mse_distillation_loss, nt_xent_loss, supcon_loss
from ..methods import MethodSpec

@dataclass
class Guidance:
    """What E2 is trained with besides NT-Xent for one method.

    lle_weights (N, N) sparse LLE weights over the training images (reading `lle`), or
    cluster_labels (N,) GMM caption-cluster ids (reading `supcon`), or mse_targets (N, T) mean caption
    embeddings (cmg-mse); at most one of them is set. `weight` is lambda of L = L_SimCLR + lambda * L_CMLE.
    """

    lle_weights: sp.csr_matrix | None = None
    cluster_labels: torch.Tensor | None = None
    mse_targets: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None  # (N,) normal-class ids 0..C-1: method `she` (a classifier, CE only)
    mix_partners: torch.Tensor | None = None  # (N, k) CMDA: each image's mixing partners (cmg_core.cmda)
    mix_weights: torch.Tensor | None = None  # (N, k) and their weights
    batch_cluster_source: torch.Tensor | None = None  # (N, T) supcon: clusters refitted per mini-batch on these
    batch_clusters: int = 5  # K of that per-batch GMM
    batch_cluster_seed: int = 0
    weight: float = 1.0
    normalize: bool = True
    supcon_temperature: float = 0.5
    supcon_with_simclr: bool = False
    mse_weight: float = 1.0

    @property
    def needs_features(self) -> bool:
        """Whether a step needs E2's features of the batch's images besides the projections (L_global,
        cmg-mse): of the un-augmented images (`e2.guidance_on: clean`) or of the two views (`views`)."""
        return self.lle_weights is not None or self.mse_targets is not None or self.class_labels is not None

    @property
    def head_dim(self) -> int:
        """Outputs of E2's linear head on h (`to_text`): the text dimension (cmg-mse), the number of normal classes
        (she: the classifier), else 0 (no head)."""
        if self.mse_targets is not None:
            return int(self.mse_targets.shape[1])
        return int(self.class_labels.max()) + 1 if self.class_labels is not None else 0

    def to(self, device) -> "Guidance":
        for k in ("cluster_labels", "mse_targets", "class_labels", "batch_cluster_source"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self


def build_guidance(spec: MethodSpec, caption_mean: torch.Tensor | None, cmle_cfg, mse_weight: float,
                   clusters_and_weights, class_labels: np.ndarray | None = None, cmda=None,
                   supcon_per_batch: bool = False) -> Guidance:
    """Guidance of one method. caption_mean (N, T) of the training images; `clusters_and_weights()` returns
    (GMM labels (N,), LLE weights (N, N) csr), computed once per run and shared by the methods; class_labels (N,)
    the normal-class ids 0..C-1 of the training images (used by `she` only); cmda () -> (config section, partners
    (N, k), weights (N, k)) for `cmda` (called only for it). supcon_per_batch: the supcon reading's clusters come
    from a GMM refitted on every mini-batch's captions (the released code; protocol.supcon_labels: batch)."""
    g = Guidance(weight=cmle_cfg.weight, normalize=cmle_cfg.normalize,
                 supcon_temperature=cmle_cfg.supcon_temperature,
                 supcon_with_simclr=cmle_cfg.supcon_with_simclr, mse_weight=mse_weight)
    if spec.le:
        labels, w = clusters_and_weights()
        if spec.reading == "lle":
            g.lle_weights = w
        elif supcon_per_batch:
            g.batch_cluster_source, g.batch_clusters = caption_mean.float(), cmle_cfg.n_clusters
        else:
            g.cluster_labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if spec.mse:
        g.mse_targets = caption_mean.float()
    if spec.base == "cmda":
        section, partners, weights = cmda()
        g.mix_partners = torch.as_tensor(partners, dtype=torch.long)
        g.mix_weights = torch.as_tensor(weights, dtype=torch.float32)
        if section.align_weight > 0:
            g.mse_targets, g.mse_weight = caption_mean.float(), section.align_weight
    if spec.base == "she":
        labels = np.asarray(class_labels) if class_labels is not None else np.zeros(0, int)
        if len(np.unique(labels)) < 2:
            raise ConfigError("method she trains a classifier on the normal classes: the task needs >= 2 normal "
                              f"classes with training images (got {len(np.unique(labels))})")
        g.class_labels = torch.as_tensor(labels, dtype=torch.long)
    return g


def e2_step_loss(g: Guidance, ids: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                 h_clean: torch.Tensor | None = None, bank: torch.Tensor | None = None,
                 text_pred: torch.Tensor | None = None, local_idx: torch.Tensor | None = None,
                 contrast_scale: float = 1.0):
    """Loss of one E2 step and its parts {loss, simclr, global, mse} (floats).

    ids (B,) training-row indices of the rows of z1, z2 (B, P), the projections of two augmented views (under
    torchrun: the batch gathered from every rank); local_idx (b,) the rows of this process's h_clean /
    text_pred (default: ids; a row may repeat, e.g. both views of an image). h_clean (b, H) the E2 features
    the guidance acts on (LLE / MSE): of the batch's un-augmented images, or of its two views;
    bank (N, H) current features of every training image with the batch's rows holding h_clean (L_global's
    neighbours; already L2-normalised when g.normalize); text_pred (b, T) E2's map of h_clean to the text
    space (cmg-mse). The contrastive term is multiplied by `contrast_scale` (world_size under DDP, which
    averages gradients of a loss over gathered rows).

    Contrastive term: NT-Xent (`temperature`), or, for the supcon reading, the supervised contrastive loss over
    both views with the caption-cluster labels as positives, which replaces NT-Xent as in the released code
    (or is added with weight lambda when `supcon_with_simclr`).
    """
    local_idx = ids if local_idx is None else local_idx
    parts = {"simclr": 0.0, "global": 0.0, "mse": 0.0, "ce": 0.0}
    if g.class_labels is not None:  # she: cross-entropy of the classifier only, no contrastive term
        if text_pred is None:
            raise ConfigError("she needs E2's classifier logits of the batch's features")
        target = g.class_labels[local_idx.to(g.class_labels.device)].to(text_pred.device)
        ce = F.cross_entropy(text_pred.float(), target)
        parts["ce"] = parts["loss"] = ce.item()
        return ce + 0.0 * (z1.sum() + z2.sum()), parts  # the projection takes part (DDP needs every parameter used)
    supcon = None
    if g.cluster_labels is not None or g.batch_cluster_source is not None:
        if g.batch_cluster_source is not None:
            text = g.batch_cluster_source[ids.to(g.batch_cluster_source.device)].cpu().numpy()
            labels = torch.from_numpy(batch_caption_clusters(text, g.batch_clusters, g.batch_cluster_seed)).to(z1.device)
        else:
            labels = g.cluster_labels[ids.to(g.cluster_labels.device)].to(z1.device)
        supcon = supcon_loss(z1, z2, labels, g.supcon_temperature)
        parts["global"] = supcon.item()
    if supcon is not None and not g.supcon_with_simclr:
        contrast = supcon
    else:
        simclr = nt_xent_loss(z1, z2, temperature)
        parts["simclr"] = simclr.item()
        contrast = simclr if supcon is None else simclr + g.weight * supcon
    loss = contrast * contrast_scale
    total = contrast.item()
    if g.lle_weights is not None:
        if h_clean is None or bank is None:
            raise ConfigError("L_global (cmle.loss=lle) needs the batch's clean features and the neighbour bank")
        hn = F.normalize(h_clean, dim=-1) if g.normalize else h_clean
        w_rows = torch.from_numpy(g.lle_weights[local_idx.cpu().numpy()].toarray()).to(hn.device, hn.dtype)
        lg = lle_reconstruction_loss(hn, w_rows, bank)
        loss = loss + g.weight * lg
        parts["global"] = lg.item()
        total += g.weight * lg.item()
    if g.mse_targets is not None:
        if text_pred is None:
            raise ConfigError("cmg-mse needs E2's text prediction of the batch's clean features")
        target = g.mse_targets[local_idx.to(g.mse_targets.device)].to(text_pred.device)
        lm = mse_distillation_loss(text_pred, target)
        loss = loss + g.mse_weight * lm
        parts["mse"] = lm.item()
        total += g.mse_weight * lm.item()
    parts["loss"] = total
    return loss, parts


@torch.no_grad()
def cmda_pairs(e1, trunk_feats: torch.Tensor, captions: torch.Tensor, neighbors: int, max_mix: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(partners (N, k), weights (N, k)) of the normal training images for `cmda`: S[i, j] = E1's matching score
    (Eq.2, cosine in E1's joint space) of image j (trunk features (N, F)) against the mean of image i's caption
    embeddings (captions (N, C, T)); `cmda.cmda_partners` picks each row's partners from S."""
    img = F.normalize(e1.image.eval()(trunk_feats.float()), dim=-1)  # (N, D)
    txt = F.normalize(e1.text.eval()(captions.float()), dim=-1).mean(1)  # (N, D) mean over captions
    sim = (F.normalize(txt, dim=-1) @ img.T).numpy()  # (N, N): row i = captions of i, column j = image j
    return cmda_partners(sim, neighbors, max_mix)
