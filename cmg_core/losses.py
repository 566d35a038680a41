"""Loss functions of CMG as small pure torch functions (one per equation of the paper).

Notation: ``B`` batch size, ``D`` embedding dimension, ``M`` number of masked variants per image,
``N`` size of a neighbour bank.  Every function takes and returns torch tensors and has no side effects.

* :func:`image_text_contrastive_loss` - Eq. 1 (InfoNCE between images and their captions; the paper anchors
  the caption, text->image, with the positive left out of the denominator: ``exclude_positive=True``).
* :func:`matching_score` - Eq. 2 (cosine similarity).
* :func:`rid_loss` / :func:`rid_accuracy` - Eq. 3 (which masked variant did CMER pick?).
* :func:`nt_xent_loss` - SimCLR NT-Xent used for the self-supervised image branch.
* :func:`lle_reconstruction_loss` - Eq. 13, L_global of CMLE.
* :func:`mse_distillation_loss` - the "MSE" alternative to CMLE of the paper's Fig. 7.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = [
    "image_text_contrastive_loss",
    "duplicate_caption_mask",
    "matching_score",
    "rid_loss",
    "rid_accuracy",
    "nt_xent_loss",
    "supcon_loss",
    "lle_reconstruction_loss",
    "mse_distillation_loss",
]


def _check_2d_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ConfigError(
            f"{names[0]} and {names[1]} must both be (B, D) with the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < 1:
        raise ConfigError(f"{names[0]} is empty (B=0)")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor, exclude_positive: bool = False) -> torch.Tensor:
    """Mean over anchors (rows) of the mean over positives p of ``-(logits[i, p] - logsumexp_j logits[i, j])``.

    ``exclude_positive``: the logsumexp runs over the negatives of the row only (``positives[i, j]`` False);
    rows without a negative are left out of the mean, and if no row has one the result is a zero that still
    carries a graph."""
    if exclude_positive:
        keep = (~positives).any(dim=1)
        if not bool(keep.any()):
            return logits.sum() * 0.0
        logits, positives = logits[keep], positives[keep]
        lse = torch.logsumexp(logits.masked_fill(positives, float("-inf")), dim=1, keepdim=True)
    else:
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = logits - lse
    pos = positives.to(log_p.dtype)
    per_anchor = -(log_p * pos).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


def image_text_contrastive_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    temperature: float = 0.07,
    symmetric: bool = False,
    positive_mask: torch.Tensor | None = None,
    exclude_positive: bool = False,
) -> torch.Tensor:
    """Eq. 1: InfoNCE between images and captions; returns a scalar.

    Both inputs are L2-normalised, ``logits[i, j] = <img_i, txt_j> / temperature`` with shapes
    ``img_emb (B, D)``, ``txt_emb (B, D)``, ``logits (B, B)``.  With ``symmetric=False`` the anchors are
    the IMAGES (image->text): image i's positive is caption i, the other captions of the batch are
    negatives, ``loss = mean_i -log softmax_j(logits[i])[i]``.

    The paper's Eq.1 anchors the CAPTION (text->image): for caption t_i the positive is its image v_i and
    the denominator sums over the images, ``-log exp(s(t_i, v_i)/tau) / sum_{j != i} exp(s(t_i, v_j)/tau)``.
    That direction alone is this function with the arguments swapped,
    ``image_text_contrastive_loss(txt_emb, img_emb, ..., positive_mask=positive_mask.T)``;
    ``symmetric=True`` averages the image->text and the text->image (``logits.T``) terms, as CLIP does.

    ``exclude_positive=True`` leaves the positive pair out of the denominator, as the paper writes it:
    ``-(logits[i, i] - logsumexp_{j != i} logits[i, j])`` (this is not bounded below: it keeps pushing the
    positive above the negatives).  Default False: the usual InfoNCE/CLIP cross-entropy, positive included.

    ``positive_mask (B, B) bool``: ``positive_mask[i, j] = True`` marks caption j as an additional
    positive of image i (e.g. identical template captions, see :func:`duplicate_caption_mask`).  The
    diagonal is always a positive.  Then each anchor's term is the SupCon-style mean over its positives
    P(i) of ``-(logits[i, p] - logsumexp_j logits[i, j])``; the logsumexp runs over every j, or with
    ``exclude_positive=True`` over the negatives j not in P(i) only (all positives are left out).  An anchor
    with no negative left is then skipped (the mean runs over the others; a zero with a graph if none is
    left, e.g. B = 1).  For the text->image direction the transposed mask is used.
    """
    _check_2d_pair(img_emb, txt_emb, ("img_emb", "txt_emb"))
    _check_temperature(temperature)
    b = img_emb.shape[0]
    img = F.normalize(img_emb, dim=-1)
    txt = F.normalize(txt_emb, dim=-1)
    logits = img @ txt.t() / temperature
    if positive_mask is None and not exclude_positive:
        target = torch.arange(b, device=logits.device)
        loss = F.cross_entropy(logits, target)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.t(), target))
        return loss
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    if positive_mask is None:
        pos = eye
    elif positive_mask.shape != (b, b):
        raise ConfigError(f"positive_mask must be (B, B) = ({b}, {b}), got {tuple(positive_mask.shape)}")
    else:
        pos = positive_mask.to(device=logits.device, dtype=torch.bool) | eye
    loss = _multi_positive_ce(logits, pos, exclude_positive)
    if symmetric:
        loss = 0.5 * (loss + _multi_positive_ce(logits.t(), pos.t(), exclude_positive))
    return loss


def duplicate_caption_mask(txt_emb: torch.Tensor, threshold: float = 0.999) -> torch.Tensor:
    """``(B, D) -> (B, B) bool``: True where the cosine similarity of two caption embeddings is
    ``>= threshold`` (identical or near-identical captions).  The diagonal is True."""
    if txt_emb.dim() != 2:
        raise ConfigError(f"txt_emb must be (B, D), got {tuple(txt_emb.shape)}")
    t = F.normalize(txt_emb.detach(), dim=-1)
    mask = (t @ t.t()) >= threshold
    mask.fill_diagonal_(True)
    return mask


def matching_score(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Eq. 2: cosine similarity over the last dimension, broadcasting the leading ones.

    ``(..., D), (..., D) -> (...)``; e.g. ``(B, M, D)`` masked-image embeddings against the caption
    ``(B, 1, D)`` give ``(B, M)``.
    """
    if img_emb.shape[-1] != txt_emb.shape[-1]:
        raise ConfigError(
            f"img_emb and txt_emb must share the last (embedding) dimension, got {tuple(img_emb.shape)} "
            f"and {tuple(txt_emb.shape)}"
        )
    return (F.normalize(img_emb, dim=-1) * F.normalize(txt_emb, dim=-1)).sum(dim=-1)


def rid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 3: cross-entropy of ``softmax(logits (B, M))`` against CMER's label ``labels (B,)`` (long,
    values in ``0..M-1``); mean over the batch."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"expected logits (B, M) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits, labels.long())


def rid_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows where ``argmax(logits (B, M)) == labels (B,)``; a python float in [0, 1]."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"expected logits (B, M) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels.to(logits.device).long()).float().mean().item()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent between two views ``z1 (B, D)`` and ``z2 (B, D)``; returns a scalar.

    The 2B views are L2-normalised; for anchor a the positive is its pair (i <-> i + B) and the other
    2B - 2 views are negatives (the anchor itself is excluded from the denominator); the logits are
    cosine similarities / temperature; the loss is the mean over the 2B anchors.
    """
    _check_2d_pair(z1, z2, ("z1", "z2"))
    _check_temperature(temperature)
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=-1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(b, device=z.device)
    target = torch.cat([idx + b, idx])
    return F.cross_entropy(sim, target)


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5,
                base_temperature: float | None = None) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, ``contrast_mode='all'``) over two views; a scalar.

    ``z1 (B, D)``, ``z2 (B, D)`` two views of the same B images, ``labels (B,)`` their classes (here: GMM
    caption clusters, CMLE as the released code trains it). The 2B views are L2-normalised; for anchor a the
    positives P(a) are every other view with the same label (its own other view included), the denominator runs
    over all 2B - 1 other views:
    ``loss = mean_a -(T / T_base) * mean_{p in P(a)} log softmax_{j != a}(z_a . z_j / T)[p]``.
    ``base_temperature`` defaults to ``temperature`` (factor 1; the released code keeps SupContrast's 0.07,
    a constant factor of about 7 at T = 0.5).
    """
    _check_2d_pair(z1, z2, ("z1", "z2"))
    _check_temperature(temperature)
    b = z1.shape[0]
    if labels.shape != (b,):
        raise ConfigError(f"labels must be (B,) = ({b},), got {tuple(labels.shape)}")
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=-1)
    lab = torch.cat([labels, labels]).to(z.device)
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_mask, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab.unsqueeze(0) == lab.unsqueeze(1)) & ~self_mask
    per_anchor = -(log_p.masked_fill(~pos, 0.0)).sum(dim=1) / pos.sum(dim=1)
    scale = temperature / (base_temperature or temperature)
    return scale * per_anchor.mean()


def lle_reconstruction_loss(z: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Eq. 13, L_global = mean_i || z_i - sum_j W_ij bank_j ||^2 (squared L2 norm, summed over D).

    ``z (B, D)``: embeddings of the anchors; ``weights (B, N)``: their LLE weights (dense, or a torch
    sparse tensor) over the ``bank (N, D)``, which holds the current embeddings of the neighbours.  When
    ``bank`` is ``z`` itself (N = B) this is ``||Z - W Z||_F^2 / B``.  Rows of W that are all zero (no
    neighbours, e.g. a singleton cluster, or a neighbourhood cut off from the batch) are excluded from
    the mean; if every row is zero the result is a zero that still carries a graph (``z.sum() * 0``).
    """
    if z.dim() != 2 or bank.dim() != 2 or weights.dim() != 2:
        raise ConfigError(
            f"expected z (B, D), weights (B, N), bank (N, D); got {tuple(z.shape)}, {tuple(weights.shape)}, {tuple(bank.shape)}"
        )
    if weights.shape[0] != z.shape[0] or weights.shape[1] != bank.shape[0] or z.shape[1] != bank.shape[1]:
        raise ConfigError(
            f"shape mismatch: z {tuple(z.shape)}, weights {tuple(weights.shape)}, bank {tuple(bank.shape)} "
            "(need weights (B, N) with z (B, D) and bank (N, D))"
        )
    w = weights.to_dense() if weights.is_sparse else weights
    w = w.to(device=z.device, dtype=z.dtype)
    valid = w.abs().sum(dim=1) > 0
    if not bool(valid.any()):
        return z.sum() * 0.0 + bank.sum() * 0.0
    recon = w[valid] @ bank
    return ((z[valid] - recon) ** 2).sum(dim=1).mean()


def mse_distillation_loss(z: torch.Tensor, target: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The "MSE" baseline of the paper's Fig. 7: regress image embeddings ``z (B, D)`` onto the text
    embeddings ``target (B, D)`` of the same dimension.

    With ``normalize=True`` both are L2-normalised first.  Returns the element-wise mean squared error
    (``torch.nn.MSELoss`` convention: mean over B * D entries).
    """
    _check_2d_pair(z, target, ("z", "target"))
    if normalize:
        z = F.normalize(z, dim=-1)
        target = F.normalize(target, dim=-1)
    return F.mse_loss(z, target.to(z.dtype))
