"""Review fixes: near-constant features in the Mahalanobis standardisation, and Eq.1's exclude_positive."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from cmg_core import losses, scoring
from cmg_core.detector import MahalanobisDetector


# ----------------------------------------------------------------------------- near-constant features
def _relu_like(seed: int, n: int = 40, d: int = 24) -> np.ndarray:
    """Non-negative features (post-ReLU); column 3 is a dead channel: exactly 0 on every training image."""
    x = np.abs(np.random.default_rng(seed).normal(size=(n, d))) + 0.5
    x[:, 3] = 0.0
    return x


def _probe(train: np.ndarray, eps: float = 0.05) -> np.ndarray:
    """The training mean, the same + eps in the dead column 3, the same + eps in a normal column 0."""
    base = train.mean(axis=0)
    dead, live = base.copy(), base.copy()
    dead[3] += eps
    live[0] += eps
    return np.stack([base, dead, live])


def _check_not_dominant(scores: np.ndarray) -> None:
    base, dead, live = scores
    assert np.isfinite(scores).all()
    # a slight activation of the dead channel must not score orders of magnitude above the same change in a
    # normal channel (with std + 1e-10 it scored ~1e16 times higher)
    assert dead <= 10 * live, scores


@pytest.mark.parametrize("covariance", ["auto", "shrinkage", "pinv", "empirical"])
def test_dead_channel_does_not_dominate_the_detector(covariance):
    train = _relu_like(0)
    det = MahalanobisDetector(covariance=covariance).fit(train)
    if covariance == "auto":
        assert det.precisions_.shape == (1, 24, 24)  # N=40 <= 2 D: Ledoit-Wolf shrinkage
    _check_not_dominant(det.score(_probe(train)))
    again = MahalanobisDetector.from_state_dict(det.state_dict())  # the rule survives a save/load
    np.testing.assert_allclose(again.score(_probe(train)), det.score(_probe(train)), rtol=1e-10)


@pytest.mark.parametrize("covariance", ["shrinkage", "pinv"])
def test_dead_channel_does_not_dominate_ssd_scores(covariance):
    train = _relu_like(1)
    _check_not_dominant(scoring.ssd_scores(train, _probe(train), covariance=covariance))


@pytest.mark.parametrize("covariance", ["shrinkage", "pinv"])
def test_near_constant_channel_does_not_dominate(covariance):
    """Round-off noise (std ~1e-13 of the features' scale) is not a variance to standardise by."""
    train = _relu_like(2)
    train[:, 3] = 1e-12 * np.abs(np.random.default_rng(3).normal(size=len(train)))
    det = MahalanobisDetector(covariance=covariance).fit(train)
    _check_not_dominant(det.score(_probe(train)))
    _check_not_dominant(scoring.ssd_scores(train, _probe(train), covariance=covariance))


def test_standardization_scale_rule():
    std = np.array([0.2, 0.1, 0.0, 1e-9, 0.3])
    typical = np.sqrt(np.mean(std**2))
    scale = scoring.standardization_scale(std)
    np.testing.assert_array_equal(scale[[0, 1, 4]], std[[0, 1, 4]])  # ordinary features: their own std
    np.testing.assert_allclose(scale[[2, 3]], typical)  # (near-)constant: the features' typical scale
    assert scoring.standardization_scale(np.zeros(4)).tolist() == [1.0] * 4  # all constant: unscaled
    # the detector and scoring.standardize share the rule
    train = _relu_like(4)
    det = MahalanobisDetector().fit(train)
    np.testing.assert_allclose(det._standardize(train), scoring.standardize(train)[0], rtol=1e-12)
    assert det._standardize(train)[:, 3].tolist() == [0.0] * len(train)


def test_normal_data_is_standardised_as_before():
    """No (near-)constant feature: z = (x - mean) / std of the L2-normalised train set, scores = sklearn."""
    rng = np.random.default_rng(5)
    train, test = rng.normal(1, 1, (200, 6)), rng.normal(1, 2, (30, 6))
    ntr = train / np.linalg.norm(train, axis=1, keepdims=True)
    nte = test / np.linalg.norm(test, axis=1, keepdims=True)
    mu, sd = ntr.mean(0), ntr.std(0)
    ztr, zte = (ntr - mu) / sd, (nte - mu) / sd
    s_tr, s_te = scoring.standardize(train, test)
    np.testing.assert_allclose(s_tr, ztr, rtol=1e-8, atol=1e-9)  # atol: l2_normalize's norm + 1e-10
    np.testing.assert_allclose(s_te, zte, rtol=1e-8, atol=1e-9)
    ref = EmpiricalCovariance().fit(ztr).mahalanobis(zte)
    for cov in ("pinv", "empirical"):
        np.testing.assert_allclose(MahalanobisDetector(covariance=cov).fit(train).score(test), ref, rtol=1e-6)
        np.testing.assert_allclose(scoring.ssd_scores(train, test, covariance=cov), ref, rtol=1e-6)


# ----------------------------------------------------------------------------- Eq.1 exclude_positive
def _ref_eq1(img, txt, tau, anchor="image", pos=None, exclude=False):
    """numpy loops.  anchor='text' is the paper's Eq.1: caption t_i, positive image v_i, denominator over
    the images (all of them, or with exclude=True only those that are not positives of t_i)."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    b = len(img)
    P = np.eye(b, dtype=bool) if pos is None else (np.asarray(pos, dtype=bool) | np.eye(b, dtype=bool))
    if anchor == "text":
        img, txt, P = txt, img, P.T
    total, count = 0.0, 0
    for i in range(b):
        s = [float(np.dot(img[i], txt[j])) / tau for j in range(b)]
        denom = [j for j in range(b) if not (exclude and P[i, j])]
        if not denom:
            continue
        lse = np.log(sum(np.exp(s[j]) for j in denom))
        terms = [-(s[p] - lse) for p in range(b) if P[i, p]]
        total += sum(terms) / len(terms)
        count += 1
    return total / count


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _loss(img, txt, tau, anchor, pos=None, exclude=False, symmetric=False):
    """The implementation in one direction: arguments swapped (and the mask transposed) anchor the caption."""
    mask = None if pos is None else torch.tensor(pos)
    if anchor == "text":
        img, txt, mask = txt, img, (None if mask is None else mask.t())
    return losses.image_text_contrastive_loss(_t(img), _t(txt), tau, symmetric=symmetric, positive_mask=mask,
                                              exclude_positive=exclude).item()


def test_eq1_exclude_positive_by_hand():
    """B = 2: -log(e^{s_ii} / e^{s_ij}) = s_ij - s_ii; without exclusion -log(e^{s_ii} / (e^{s_ii} + e^{s_ij}))."""
    img, txt = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.6, 0.8], [0.0, 1.0]])
    s = img @ txt.T / 0.5  # already unit rows
    want_img = np.mean([s[0, 1] - s[0, 0], s[1, 0] - s[1, 1]])  # image anchors
    want_txt = np.mean([s[1, 0] - s[0, 0], s[0, 1] - s[1, 1]])  # caption anchors (the paper)
    assert _loss(img, txt, 0.5, "image", exclude=True) == pytest.approx(want_img, rel=1e-12)
    assert _loss(img, txt, 0.5, "text", exclude=True) == pytest.approx(want_txt, rel=1e-12)
    plain = np.mean([np.log1p(np.exp(s[1, 0] - s[0, 0])), np.log1p(np.exp(s[0, 1] - s[1, 1]))])
    assert _loss(img, txt, 0.5, "text") == pytest.approx(plain, rel=1e-12)


@pytest.mark.parametrize("anchor", ["image", "text"])
@pytest.mark.parametrize("exclude", [False, True])
def test_eq1_matches_reference(anchor, exclude):
    rng = np.random.default_rng(6)
    img, txt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = _loss(img, txt, 0.2, anchor, exclude=exclude)
    assert got == pytest.approx(_ref_eq1(img, txt, 0.2, anchor, exclude=exclude), rel=1e-10)


@pytest.mark.parametrize("anchor", ["image", "text"])
@pytest.mark.parametrize("exclude", [False, True])
def test_eq1_positive_mask_matches_reference(anchor, exclude):
    rng = np.random.default_rng(7)
    img, txt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    pos = np.zeros((4, 4), dtype=bool)
    pos[0, 2] = pos[2, 0] = True  # images 0 and 2 share a caption
    pos[1, 3] = True  # an asymmetric extra positive
    got = _loss(img, txt, 0.1, anchor, pos=pos, exclude=exclude)
    assert got == pytest.approx(_ref_eq1(img, txt, 0.1, anchor, pos=pos, exclude=exclude), rel=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_eq1_symmetric_is_the_mean_of_both_directions(masked):
    rng = np.random.default_rng(8)
    img, txt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    pos = None
    if masked:
        pos = np.zeros((4, 4), dtype=bool)
        pos[0, 2] = pos[2, 0] = pos[1, 3] = True
    for exclude in (False, True):
        want = 0.5 * (_ref_eq1(img, txt, 0.3, "image", pos, exclude) + _ref_eq1(img, txt, 0.3, "text", pos, exclude))
        got = _loss(img, txt, 0.3, "image", pos=pos, exclude=exclude, symmetric=True)
        assert got == pytest.approx(want, rel=1e-10)


def test_eq1_exclude_positive_default_and_gradient():
    rng = np.random.default_rng(9)
    img = _t(rng.normal(size=(4, 3))).requires_grad_(True)
    txt = _t(rng.normal(size=(4, 3)))
    default = losses.image_text_contrastive_loss(img, txt, 0.1)
    assert default.item() == losses.image_text_contrastive_loss(img, txt, 0.1, exclude_positive=False).item()
    loss = losses.image_text_contrastive_loss(img, txt, 0.1, exclude_positive=True)
    assert loss.item() != pytest.approx(default.item())
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_eq1_exclude_positive_without_negatives_is_a_zero_with_a_graph():
    """Every caption identical (all positives): no negatives left in any denominator."""
    img = _t(np.random.default_rng(10).normal(size=(3, 2))).requires_grad_(True)
    txt = _t(np.ones((3, 2)))
    mask = losses.duplicate_caption_mask(txt)
    loss = losses.image_text_contrastive_loss(img, txt, 0.1, symmetric=True, positive_mask=mask,
                                              exclude_positive=True)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    single = losses.image_text_contrastive_loss(img[:1], txt[:1], 0.1, exclude_positive=True)  # B = 1
    assert single.item() == 0.0
