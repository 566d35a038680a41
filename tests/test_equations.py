"""The paper's equations (cmg_core.losses / masks / cmle / scoring / metrics) against hand-written
numpy references (explicit loops and formulas, never the implementation under test)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.covariance import EmpiricalCovariance
from sklearn.manifold._locally_linear import barycenter_weights

from cmg_core import cmle, losses, masks, metrics, regions, scoring
from cmg_core.errors import ConfigError, DataError
from tests import reference

RNG = np.random.default_rng(0)


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


# ----------------------------------------------------------------------------- Eq. 1 (contrastive)
def _ref_info_nce(img, txt, tau, symmetric=False, pos=None):
    b = len(img)
    I = [_unit(r) for r in img]
    T = [_unit(r) for r in txt]
    L = [[sum(a * c for a, c in zip(I[i], T[j])) / tau for j in range(b)] for i in range(b)]
    P = [[(i == j) or (pos is not None and bool(pos[i][j])) for j in range(b)] for i in range(b)]

    def direction(L, P):
        total = 0.0
        for i in range(b):
            lse = math.log(sum(math.exp(x) for x in L[i]))
            terms = [-(L[i][j] - lse) for j in range(b) if P[i][j]]
            total += sum(terms) / len(terms)
        return total / b

    loss = direction(L, P)
    if symmetric:
        LT = [[L[j][i] for j in range(b)] for i in range(b)]
        PT = [[P[j][i] for j in range(b)] for i in range(b)]
        loss = 0.5 * (loss + direction(LT, PT))
    return loss


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_eq1(symmetric):
    img, txt = RNG.normal(size=(5, 3)), RNG.normal(size=(5, 3))
    got = losses.image_text_contrastive_loss(_t(img), _t(txt), temperature=0.2, symmetric=symmetric)
    assert got.item() == pytest.approx(_ref_info_nce(img.tolist(), txt.tolist(), 0.2, symmetric), rel=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_eq1_positive_mask(symmetric):
    img, txt = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    pos = np.zeros((4, 4), dtype=bool)
    pos[0, 2] = pos[2, 0] = True  # images 0 and 2 share a caption
    pos[1, 3] = True  # asymmetric extra positive
    got = losses.image_text_contrastive_loss(
        _t(img), _t(txt), temperature=0.1, symmetric=symmetric, positive_mask=torch.tensor(pos)
    )
    want = _ref_info_nce(img.tolist(), txt.tolist(), 0.1, symmetric, pos.tolist())
    assert got.item() == pytest.approx(want, rel=1e-10)
    plain = losses.image_text_contrastive_loss(_t(img), _t(txt), temperature=0.1, symmetric=symmetric)
    assert abs(got.item() - plain.item()) > 1e-6  # the mask changes the loss


def test_duplicate_caption_mask():
    txt = _t([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # 0 and 1 are the same direction
    m = losses.duplicate_caption_mask(txt)
    assert m.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


# ----------------------------------------------------------------------------- Eq. 2 and Eq. 3
def test_matching_score_eq2_broadcast():
    img, txt = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 1, 4))
    got = losses.matching_score(_t(img), _t(txt))
    assert got.shape == (2, 3)
    for b in range(2):
        for m in range(3):
            a, c = img[b, m], txt[b, 0]
            ref = sum(a * c) / (math.sqrt(sum(a * a)) * math.sqrt(sum(c * c)))
            assert got[b, m].item() == pytest.approx(ref, rel=1e-10)


def test_rid_loss_eq3_and_accuracy():
    logits = RNG.normal(size=(3, 4))
    labels = [2, 0, 3]
    ref = 0.0
    for i in range(3):
        p = math.exp(logits[i, labels[i]]) / sum(math.exp(x) for x in logits[i])
        ref += -math.log(p) / 3
    got = losses.rid_loss(_t(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(ref, rel=1e-10)
    acc_ref = sum(int(np.argmax(logits[i]) == labels[i]) for i in range(3)) / 3
    assert losses.rid_accuracy(_t(logits), torch.tensor(labels)) == pytest.approx(acc_ref)


def test_nt_xent():
    z1, z2 = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    z = [_unit(r) for r in np.concatenate([z1, z2]).tolist()]
    n, tau, ref = 6, 0.5, 0.0
    for a in range(n):
        p = (a + 3) % n
        sims = {j: sum(x * y for x, y in zip(z[a], z[j])) / tau for j in range(n) if j != a}
        ref += -math.log(math.exp(sims[p]) / sum(math.exp(v) for v in sims.values())) / n
    assert losses.nt_xent_loss(_t(z1), _t(z2), temperature=tau).item() == pytest.approx(ref, rel=1e-10)


# ----------------------------------------------------------------------------- Eq. 13 and MSE
def test_lle_reconstruction_loss_eq13():
    z, bank = RNG.normal(size=(3, 2)), RNG.normal(size=(4, 2))
    w = np.array([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0.2, 0, 0.3, 0.5]])
    terms = []
    for i in range(3):
        if all(w[i, j] == 0 for j in range(4)):
            continue
        r = [z[i, d] - sum(w[i, j] * bank[j, d] for j in range(4)) for d in range(2)]
        terms.append(sum(x * x for x in r))
    zt = _t(z).requires_grad_(True)
    got = losses.lle_reconstruction_loss(zt, _t(w), _t(bank))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    got.backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0 and zt.grad[1].abs().sum() == 0


def test_lle_reconstruction_loss_self_bank_and_all_zero():
    z = RNG.normal(size=(3, 2))
    w = np.array([[0, 1.0, 0], [0.5, 0, 0.5], [0, 1.0, 0]])
    ref = np.sum((z - w @ z) ** 2) / 3  # ||Z - WZ||^2 / B
    zt = _t(z)
    assert losses.lle_reconstruction_loss(zt, _t(w), zt).item() == pytest.approx(ref, rel=1e-10)
    zg = _t(z).requires_grad_(True)
    zero = losses.lle_reconstruction_loss(zg, torch.zeros(3, 3, dtype=torch.float64), zg)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()


def test_mse_distillation_loss():
    z, t = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3))
    zn = [_unit(r) for r in z.tolist()]
    tn = [_unit(r) for r in t.tolist()]
    ref = sum((zn[i][d] - tn[i][d]) ** 2 for i in range(2) for d in range(3)) / 6
    assert losses.mse_distillation_loss(_t(z), _t(t)).item() == pytest.approx(ref, rel=1e-10)
    raw = sum((z[i, d] - t[i, d]) ** 2 for i in range(2) for d in range(3)) / 6
    assert losses.mse_distillation_loss(_t(z), _t(t), normalize=False).item() == pytest.approx(raw, rel=1e-10)


# ----------------------------------------------------------------------------- masks
def test_grid_masks_m4_6x6():
    mk = masks.grid_masks(6, 6, 4)
    assert mk.shape == (4, 1, 6, 6)
    for m, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        ref = np.ones((6, 6))
        ref[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = 0
        assert np.array_equal(mk[m, 0].numpy(), ref)
    soft = masks.grid_masks(6, 6, 4, mode="soft", soft_value=0.1)
    assert np.allclose(np.unique(soft[3, 0].numpy()), [0.1, 1.0])
    assert np.allclose(soft[3, 0, 3:, 3:].numpy(), 0.1) and soft[3, 0, :3].eq(1).all()


def test_grid_masks_m9_7x7_exact():
    # linspace(0, 7, 4) = 0, 2.33, 4.67, 7 -> edges 0, 2, 5, 7 (cells of 2, 3, 2 px)
    assert regions.grid_regions(7, 7, 9)[4] == (2, 5, 2, 5)
    center = np.array(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
        ]
    )
    mk = masks.grid_masks(7, 7, 9)
    assert np.array_equal(mk[4, 0].numpy(), center)
    last = np.ones((7, 7))
    last[5:, 5:] = 0
    assert np.array_equal(mk[8, 0].numpy(), last)
    assert np.array_equal(mk.sum(0)[0].numpy(), np.full((7, 7), 8.0))  # regions tile the image exactly


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_masked_pictures_are_apply_masks_in_numpy(mode):
    """The app's pictures (regions.masked_pictures, no torch) are training's apply_masks(image, grid_masks)."""
    img = np.random.default_rng(1).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    pics = regions.masked_pictures(img, 9, mode, 0.2)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    ref = masks.apply_masks(x, masks.grid_masks(9, 7, 9, mode, 0.2))[0].permute(0, 2, 3, 1).mul(255).round().byte()
    assert pics.shape == (9, 9, 7, 3) and pics.dtype == np.uint8 and np.array_equal(pics, ref.numpy())


def test_grid_regions_errors():
    with pytest.raises(ConfigError, match=r"M=8 is not a square number"):
        regions.grid_regions(8, 8, 8)
    with pytest.raises(ConfigError, match="not a square"):
        masks.grid_masks(8, 8, 0)
    with pytest.raises(ConfigError):
        masks.grid_masks(8, 8, 4, mode="blur")
    with pytest.raises(ConfigError):
        masks.grid_masks(8, 8, 4, mode="soft", soft_value=1.0)


def test_apply_select_and_cmer_labels():
    imgs = RNG.normal(size=(2, 3, 4, 4))
    mk = masks.grid_masks(4, 4, 4)
    fill = [0.5, -1.0, 2.0]
    out = masks.apply_masks(_t(imgs), mk, fill=fill)
    assert out.shape == (2, 4, 3, 4, 4)
    for b in range(2):
        for m in range(4):
            for c in range(3):
                ref = imgs[b, c].copy()
                r0, c0 = 2 * (m // 2), 2 * (m % 2)
                ref[r0 : r0 + 2, c0 : c0 + 2] = fill[c]
                assert np.allclose(out[b, m, c].numpy(), ref)
    plain = masks.apply_masks(_t(imgs), mk)
    assert plain[1, 0, :, :2, :2].abs().sum() == 0
    sel = masks.select_masked(out, torch.tensor([3, 1]))
    assert torch.equal(sel[0], out[0, 3]) and torch.equal(sel[1], out[1, 1])
    assert masks.cmer_labels(_t([[0.1, 0.9, 0.3], [0.7, 0.2, 0.1]])).tolist() == [1, 0]


# ----------------------------------------------------------------------------- CMLE (Eq. 9-12)
def _ref_barycenter(x, nb, reg):
    k = len(nb)
    G = np.array([[np.dot(nb[a] - x, nb[b] - x) for b in range(k)] for a in range(k)])
    tr = sum(G[a, a] for a in range(k))
    for a in range(k):
        G[a, a] += reg * tr if tr > 0 else reg
    w = np.linalg.solve(G, np.ones(k))
    return w / w.sum()


def test_barycentric_weights_match_sklearn_and_reconstruct():
    X = RNG.normal(size=(8, 5))
    w = cmle.barycentric_weights(X[0], X[1:5], reg=1e-3)
    assert w.sum() == pytest.approx(1.0)
    assert np.allclose(w, barycenter_weights(X[:1], X, np.array([[1, 2, 3, 4]]), reg=1e-3)[0], atol=1e-12)
    assert np.allclose(w, _ref_barycenter(X[0], X[1:5], 1e-3), atol=1e-12)
    # a point in the affine hull of its neighbours is reconstructed exactly (up to the regulariser)
    nb = RNG.normal(size=(3, 5))
    true_w = np.array([0.2, 0.5, 0.3])
    x = true_w @ nb
    w = cmle.barycentric_weights(x, nb, reg=1e-10)
    assert np.allclose(w, true_w, atol=1e-6) and np.allclose(w @ nb, x, atol=1e-6)
    dup = cmle.barycentric_weights(np.ones(3), np.ones((2, 3)))  # trace 0: uniform weights
    assert np.allclose(dup, [0.5, 0.5])


def test_lle_weight_matrix_knn_and_all_members():
    X = RNG.normal(size=(7, 3))
    W = cmle.lle_weight_matrix(X, n_neighbors=3)
    assert np.allclose(np.diag(W), 0) and np.allclose(W.sum(1), 1)
    for i in range(7):
        d = [np.sum((X[i] - X[j]) ** 2) if j != i else np.inf for j in range(7)]
        nn = sorted(np.argsort(d)[:3])
        assert set(np.flatnonzero(W[i])) <= set(nn)
        assert np.allclose(W[i, nn], _ref_barycenter(X[i], X[nn], 1e-3), atol=1e-10)
    Wall = cmle.lle_weight_matrix(X, n_neighbors=None)
    for i in range(7):
        others = [j for j in range(7) if j != i]
        assert np.allclose(Wall[i, others], _ref_barycenter(X[i], X[others], 1e-3), atol=1e-10)
        assert Wall[i, i] == 0
    with pytest.warns(UserWarning, match="n=4 points has only 3 other members"):
        small = cmle.lle_weight_matrix(X[:4], n_neighbors=10)
    assert np.allclose(small.sum(1), 1)
    assert np.array_equal(cmle.lle_weight_matrix(X[:1]), np.zeros((1, 1)))


def test_cmle_weights_block_structure():
    X = RNG.normal(size=(7, 4))
    labels = np.array([0, 0, 1, 1, 1, 0, 2])  # cluster 2 is a singleton
    with pytest.warns(UserWarning, match="cluster 2"):
        W = cmle.cmle_weights(X, labels, n_neighbors=2)
    assert sp.isspmatrix_csr(W) and W.shape == (7, 7)
    D = W.toarray()
    for i in range(7):
        for j in range(7):
            if labels[i] != labels[j] or i == j:
                assert D[i, j] == 0
    sums = D.sum(1)
    assert np.allclose(sums[:6], 1) and sums[6] == 0
    members = [2, 3, 4]
    for i in members:
        others = [j for j in members if j != i]
        assert np.allclose(D[i, others], _ref_barycenter(X[i], X[others], 1e-3), atol=1e-10)


def test_neighbour_batch_and_weight_block():
    W = sp.csr_matrix(np.array([[0, 0.5, 0.5, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]))
    assert cmle.neighbour_batch_indices(W, np.array([0, 3])).tolist() == [0, 3, 1, 2]
    assert cmle.neighbour_batch_indices(W, np.array([0, 3]), max_size=3).tolist() == [0, 3, 1]
    block = cmle.batch_weight_block(W, np.array([0, 3, 1]))  # row 0 misses neighbour 2 -> zeroed
    assert np.allclose(block, [[0, 0, 0], [0, 0, 0], [1, 0, 0]])


def test_fit_caption_clusters_and_k_gt_n():
    X = np.concatenate([RNG.normal(size=(10, 3)), RNG.normal(size=(10, 3)) + 20])
    labels, gmm = cmle.fit_caption_clusters(X, n_clusters=2, seed=0)
    assert labels.shape == (20,) and len(set(labels[:10])) == 1 and labels[0] != labels[10]
    with pytest.raises(ConfigError, match=r"K=5.*N=3"):
        cmle.fit_caption_clusters(RNG.normal(size=(3, 2)), n_clusters=5)


# ----------------------------------------------------------------------------- scoring (Eq. 14, SSD)
def test_mahalanobis_matches_sklearn():
    train, x = RNG.normal(size=(50, 4)), RNG.normal(size=(6, 4))
    mean, prec = scoring.fit_gaussian(train, "pinv")
    ref = EmpiricalCovariance().fit(train).mahalanobis(x)
    assert np.allclose(scoring.mahalanobis_sq(x, mean, prec), ref, rtol=1e-8)
    for cov in ("empirical", "shrinkage"):
        m, p = scoring.fit_gaussian(train, cov)
        assert np.all(np.isfinite(scoring.mahalanobis_sq(x, m, p)))
    d = x - train.mean(0)
    C = sum(np.outer(r, r) for r in train - train.mean(0)) / 50
    hand = [float(v @ np.linalg.inv(C) @ v) for v in d]
    assert np.allclose(scoring.mahalanobis_sq(x, mean, prec), hand, rtol=1e-8)


def test_singular_covariance_and_n1_error():
    train = RNG.normal(size=(3, 10))  # N < D: singular covariance
    train[:, 1] = train[:, 0]
    for cov in ("pinv", "shrinkage", "empirical"):
        s = reference.cluster_min_mahalanobis(train, RNG.normal(size=(5, 10)), covariance=cov)
        assert np.all(np.isfinite(s))
    with pytest.raises(ConfigError, match="N=1"):
        scoring.fit_gaussian(RNG.normal(size=(1, 3)))


def test_cluster_min_equals_min_of_per_cluster_references():
    centers = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], dtype=float)
    train = np.concatenate([c + RNG.normal(size=(15, 3)) for c in centers])
    test = RNG.normal(size=(8, 3)) * 6
    got = reference.cluster_min_mahalanobis(train, test, n_clusters=3, seed=0)
    lab = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(train)
    per = []
    for c in range(3):
        xc = train[lab == c]
        mu = xc.mean(0)
        C = (xc - mu).T @ (xc - mu) / len(xc)
        P = np.linalg.pinv(C)
        per.append([float((t - mu) @ P @ (t - mu)) for t in test])
    assert np.allclose(got, np.min(per, axis=0), rtol=1e-8)
    with pytest.raises(ConfigError, match="n_clusters=50"):
        reference.cluster_min_mahalanobis(train, test, n_clusters=50)


def test_standardize_and_ssd_separates_outlier():
    tr, te = RNG.normal(size=(5, 3)) + 1, RNG.normal(size=(2, 3))
    s_tr, s_te = reference.standardize(tr, te)
    ntr = tr / (np.sqrt((tr**2).sum(1, keepdims=True)) + 1e-10)
    nte = te / (np.sqrt((te**2).sum(1, keepdims=True)) + 1e-10)
    mu, sd = ntr.mean(0), ntr.std(0)
    assert np.allclose(s_tr, (ntr - mu) / (sd + 1e-10)) and np.allclose(s_te, (nte - mu) / (sd + 1e-10))
    direction = np.array([1.0, 1.0, 0, 0, 0, 0])
    train = direction * 5 + RNG.normal(size=(200, 6)) * 0.3
    test = np.concatenate([direction * 5 + RNG.normal(size=(20, 6)) * 0.3, [[0, 0, 0, 0, -5.0, 5.0]]])
    s = reference.ssd_scores(train, test, n_clusters=2)
    assert np.all(np.isfinite(s)) and s[-1] > s[:-1].max()
    bad = test.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="test_feats"):
        reference.ssd_scores(train, bad)


# ----------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.1, 0.4])
    pairs = [(a, n) for a in s[y == 1] for n in s[y == 0]]
    ref = sum(1.0 if a > n else 0.5 if a == n else 0.0 for a, n in pairs) / len(pairs)
    assert metrics.auroc(y, s) == pytest.approx(ref)  # 4/6
    # AP: ranks 0.9(A) 0.8(N) 0.4(N) 0.3(A): P@R=.5 is 1, P@R=1 is 2/4
    assert metrics.aupr(y, s) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert metrics.detection_metrics([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])["auroc"] == pytest.approx(100.0)
    fpr, tpr = metrics.roc_points(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1


def test_fpr95_constructed_case():
    anomalies = np.arange(1, 21, dtype=float)  # 20 anomalies; detecting 19 needs threshold 2
    normals = np.arange(10) + 0.5  # 0.5 .. 9.5: 8 of them are >= 2
    y = np.r_[np.ones(20), np.zeros(10)]
    s = np.r_[anomalies, normals]
    assert metrics.fpr_at_95_tpr(y, s) == pytest.approx(0.8)
    assert metrics.detection_metrics(y, s)["fpr95"] == pytest.approx(80.0)
    assert metrics.fpr_at_95_tpr([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 0.0


def test_metrics_one_class_errors():
    for fn in (metrics.auroc, metrics.aupr, metrics.fpr_at_95_tpr):
        with pytest.raises(DataError, match="both classes"):
            fn([0, 0, 0], [0.1, 0.2, 0.3])


def test_mean_ci():
    v = [1.0, 2.0, 4.0, 7.0]
    mean = sum(v) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / 3)
    m, h = metrics.mean_ci(v)
    assert m == pytest.approx(mean) and h == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    assert metrics.mean_ci([3.0]) == (3.0, 0.0)
    m90, h90 = metrics.mean_ci(v, confidence=0.9)
    assert h90 == pytest.approx(stats.t.ppf(0.95, 3) * sd / 2) and h90 < h


def test_masked_average_pool_matches_numpy_reference():
    """Feature-space masking: each map cell weighted by the mean mask value over the pixels it pools."""
    from cmg_core.features import masked_average_pool

    maps = RNG.normal(size=(2, 5, 4, 4))
    # hard 2x2 grid on 8x8 px, 4x4 maps: each region covers exactly a 2x2 block of cells, which drops out
    out = masked_average_pool(_t(maps), masks.grid_masks(8, 8, 4)).numpy()
    assert out.shape == (2, 4, 5)
    for m in range(4):
        keep = np.ones((4, 4), bool)
        r0, c0 = 2 * (m // 2), 2 * (m % 2)
        keep[r0 : r0 + 2, c0 : c0 + 2] = False
        np.testing.assert_allclose(out[:, m], maps[:, :, keep].mean(-1), rtol=1e-5, atol=1e-6)
    # soft 3x3 grid on 12x12 px, 4x4 maps: fractional overlaps (a cell is 3x3 px, a region 4x4 px)
    mk = masks.grid_masks(12, 12, 9, mode="soft", soft_value=0.1)
    out = masked_average_pool(_t(maps), mk).numpy()
    for m in range(9):
        w = mk[m, 0].numpy().reshape(4, 3, 4, 3).mean((1, 3))  # mean mask value per cell
        ref = (maps * w).sum((-2, -1)) / w.sum()
        np.testing.assert_allclose(out[:, m], ref, rtol=1e-5, atol=1e-6)
    # no mask = the ordinary average pool
    ones = torch.ones(1, 1, 8, 8)
    np.testing.assert_allclose(masked_average_pool(_t(maps), ones).numpy()[:, 0], maps.mean((-2, -1)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError):
        masked_average_pool(_t(maps[0]), ones)


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
