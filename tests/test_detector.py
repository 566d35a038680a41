import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance

from cmg_core import scoring
from cmg_core.detector import MahalanobisDetector, resolve_covariance
from cmg_core.errors import ConfigError, DataError
from tests.reference import cluster_min_mahalanobis, ssd_scores, standardize


@pytest.mark.parametrize("k", [1, 3])
def test_detector_matches_one_shot_scoring(k):
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(c, 1, (60, 5)) for c in (0, 4, 8)])
    test = rng.normal(2, 3, (20, 5))
    det = MahalanobisDetector(n_clusters=k, covariance="pinv", seed=0).fit(train)
    tr, te = standardize(train, test)
    ref = cluster_min_mahalanobis(tr, te, n_clusters=k, covariance="pinv", seed=0)
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-8)
    again = MahalanobisDetector.from_state_dict(det.state_dict())
    np.testing.assert_allclose(again.score(test), ref, rtol=1e-8)


def test_auto_covariance_keeps_training_scores_informative():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(40, 64))  # N < D: pinv puts every training point at distance N - 1
    train[:, 0] += 20  # normal data points along e0
    pinv = MahalanobisDetector(covariance="pinv").fit(train)
    assert np.allclose(pinv.train_scores_, 39, rtol=1e-6)
    auto = MahalanobisDetector(covariance="auto").fit(train)
    assert resolve_covariance("auto", 40, 64) == "shrinkage" and resolve_covariance("auto", 500, 64) == "pinv"
    assert auto.train_scores_.std() > 0.02 * auto.train_scores_.mean()  # pinv: std ~ 1e-12
    far_x = rng.normal(size=(5, 64))
    far_x[:, 1] += 20  # anomalies point along e1
    far = auto.score(far_x)  # a shifted direction (scale alone is normalised away)
    assert (far > auto.train_scores_.max()).all() and (auto.percentile(far) == 100).all()


def test_detector_errors():
    with pytest.raises(ConfigError, match="before fit"):
        MahalanobisDetector().score(np.zeros((2, 3)))
    with pytest.raises(DataError, match="NaN"):
        MahalanobisDetector().fit(np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 1.0]]))
    with pytest.raises(ConfigError, match="n_clusters"):
        MahalanobisDetector(n_clusters=10).fit(np.random.default_rng(0).normal(size=(5, 3)))
    det = MahalanobisDetector().fit(np.random.default_rng(0).normal(size=(30, 3)))
    with pytest.raises(DataError, match="expects"):
        det.score(np.zeros((2, 4)))
    # a singular covariance (duplicated columns) still scores finitely
    x = np.random.default_rng(2).normal(size=(50, 2))
    sing = MahalanobisDetector(covariance="pinv").fit(np.c_[x, x])
    assert np.isfinite(sing.score(np.c_[x, x] + 1)).all()


def test_fit_with_a_given_partition_matches_per_group_gaussians():
    """labels= replaces k-means: the score is the min over the given groups' Gaussians."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (40, 3)), rng.normal(6, 1, (40, 3))])
    labels = np.repeat([0, 1], 40)
    det = MahalanobisDetector(covariance="empirical").fit(x, labels)
    assert det.means_.shape == (2, 3)
    test = rng.normal(3, 2, (10, 3))
    z, zt = det._standardize(x), det._standardize(test)
    ref = np.min([((zt - z[labels == c].mean(0)) @ np.linalg.pinv(np.cov(z[labels == c].T, bias=True))
                   * (zt - z[labels == c].mean(0))).sum(1) for c in (0, 1)], axis=0)
    np.testing.assert_allclose(det.score(test), ref, rtol=1e-6)
    with pytest.raises(DataError):
        MahalanobisDetector().fit(x, labels[:-1])


def test_threshold_is_calibrated_by_cross_fitting():
    """With N close to D the training points sit closer to their own fit than new normal points do: the 95th
    percentile of the training scores flags far more than 5 % of new normal points, the cross-fitted threshold
    about 5 %."""
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.2, 2.0, 48))
    train = rng.multivariate_normal(np.full(48, 3.0), cov, size=200)
    new = rng.multivariate_normal(np.full(48, 3.0), cov, size=20000)
    det = MahalanobisDetector(fpr=0.05).fit(train)
    assert det.calibrated_
    naive = np.mean(det.score(new) > np.percentile(det.train_scores_, 95))
    realised = det.predict(new).mean()
    assert naive > 0.15
    assert 0.02 <= realised <= 0.09, realised
    assert np.array_equal(det.predict(new[:50]), (det.decision_function(new[:50]) > det.threshold_).astype(int))
    assert MahalanobisDetector(fpr=0.2).fit(train).predict(new).mean() > realised


def test_calibration_survives_state_dict_and_old_states_say_uncalibrated():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(60, 5))
    det = MahalanobisDetector(n_clusters=2, calibration_folds=5).fit(train)
    back = MahalanobisDetector.from_state_dict(det.state_dict())
    assert back.calibrated_ and back.threshold_ == det.threshold_
    np.testing.assert_allclose(back.percentile(det.score(train[:5])), det.percentile(det.score(train[:5])))
    old = {k: v for k, v in det.state_dict().items()
           if k not in ("fpr", "calibration_folds", "calibration_scores_", "threshold_", "calibrated_")}
    legacy = MahalanobisDetector.from_state_dict(old)
    assert not legacy.calibrated_ and "uncalibrated" in legacy.describe_threshold()
    assert legacy.threshold_ == np.quantile(det.train_scores_, 0.95, method="higher")
    assert not MahalanobisDetector(calibration_folds=0).fit(train).calibrated_
    with pytest.raises(ConfigError, match="detector.fpr"):
        MahalanobisDetector(fpr=5).fit(train)


def _knn_reference(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Brute force: mean of the k smallest Euclidean distances between L2-normalised rows."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = np.sqrt(((b[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k].mean(1)


@pytest.mark.parametrize("k", [1, 5])
def test_knn_score_matches_a_brute_force_reference(k):
    from cmg_core.detector import KNNDetector

    rng = np.random.default_rng(4)
    train, test = rng.normal(size=(40, 6)), rng.normal(size=(12, 6))
    det = KNNDetector(k=k).fit(train)
    np.testing.assert_allclose(det.score(test), _knn_reference(train, test, k), rtol=1e-8)
    np.testing.assert_allclose(det.decision_function(test), det.score(test))
    back = KNNDetector.from_state_dict(det.state_dict())  # what a run folder stores: float32 features
    assert det.state_dict()["train_"].dtype == np.float32
    np.testing.assert_allclose(back.score(test), det.score(test), rtol=1e-6)
    assert back.threshold_ == det.threshold_ and back.calibrated_
    if k == 1:  # in sample, each point is its own nearest neighbour
        assert np.allclose(det.train_scores_, 0, atol=1e-6)


def test_knn_threshold_is_calibrated_by_cross_fitting():
    """A training point is its own nearest neighbour, so the training scores are far too low to threshold on;
    the cross-fitted threshold flags about fpr of new normal points."""
    from cmg_core.detector import KNNDetector

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 16)) * 3
    draw = lambda n: centres[rng.integers(4, size=n)] + rng.normal(size=(n, 16))  # noqa: E731
    det = KNNDetector(k=5, fpr=0.05).fit(draw(300))
    new = draw(20000)
    naive = np.mean(det.score(new) > np.quantile(det.train_scores_, 0.95))
    realised = det.predict(new).mean()
    assert naive > 0.15
    assert 0.02 <= realised <= 0.09, realised


def test_knn_errors_name_the_setting():
    from cmg_core.detector import KNNDetector, make_detector
    from cmg_core.config import load_config

    x = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ConfigError, match="detector.knn_k=6"):
        KNNDetector(k=6).fit(x)
    with pytest.raises(ConfigError, match="before fit"):
        KNNDetector().score(x)
    with pytest.raises(DataError, match="expects"):
        KNNDetector(k=2).fit(x).score(np.zeros((2, 4)))
    assert not KNNDetector(k=5, calibration_folds=10).fit(x).calibrated_  # folds of 5 rows leave < k to fit on
    cfg = load_config(None, ["detector.knn_k=3"]).detector
    assert make_detector("knn", cfg).k == 3 and make_detector("mahalanobis", cfg).n_clusters == cfg.n_clusters
    with pytest.raises(ConfigError, match="detector.scorers"):
        load_config(None, ["detector.scorers=[mahalanobis, lof]"])
    with pytest.raises(ConfigError, match="detector.knn_k"):
        load_config(None, ["detector.knn_k=0"])


@pytest.mark.parametrize("covariance", ["shrinkage", "pinv", "empirical"])
def test_precision_factor_equals_the_dense_precision(covariance):
    """N < D: the factored precision (Woodbury for Ledoit-Wolf, SVD for the pseudo-inverses) gives the dense
    precision's distances without a (D, D) matrix; N >= D: no factor (the dense one is no larger)."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    from cmg_core.scoring import (factored_mahalanobis_sq, fit_gaussian, ledoit_wolf_shrinkage_gram,
                                  mahalanobis_sq, precision_factor)

    rng = np.random.default_rng(3)
    train = rng.normal(size=(12, 30)) @ rng.normal(size=(30, 30))
    test = rng.normal(size=(7, 30)) * 3
    mean, precision = fit_gaussian(train, covariance)
    factor = precision_factor(train, covariance)
    assert factor[3].shape[0] <= 12 and np.allclose(factor[0], mean)
    for x in (train, test):
        np.testing.assert_allclose(factored_mahalanobis_sq(x, *factor), mahalanobis_sq(x, mean, precision),
                                   rtol=1e-8, atol=1e-8)
    centered = train - train.mean(0)
    assert np.isclose(ledoit_wolf_shrinkage_gram(centered), ledoit_wolf_shrinkage(centered, assume_centered=True))
    assert precision_factor(rng.normal(size=(40, 30)), covariance) is None


def test_detector_with_fewer_images_than_dimensions_stores_a_factor():
    rng = np.random.default_rng(5)
    train, test = rng.normal(size=(20, 64)), rng.normal(size=(6, 64))
    det = MahalanobisDetector(calibration_folds=4).fit(train)
    assert det.factors_.shape[1:] == (20, 64) and not hasattr(det, "precisions_")
    dense = MahalanobisDetector(calibration_folds=4)
    dense.mean_, dense.std_, dense.scale_ = det.mean_, det.std_, det.scale_
    dense.means_ = det.means_
    dense.precisions_ = np.stack([fit_gaussian_of(det, train)])
    np.testing.assert_allclose(det.score(test), dense.score(test), rtol=1e-8)
    back = MahalanobisDetector.from_state_dict(det.state_dict())
    np.testing.assert_allclose(back.score(test), det.score(test), rtol=1e-12)
    assert "precisions_" not in det.state_dict() and back.threshold_ == det.threshold_


def fit_gaussian_of(det, train):
    """The dense Ledoit-Wolf precision of the detector's standardised training features."""
    from cmg_core.scoring import fit_gaussian

    return fit_gaussian(det._standardize(train), "shrinkage")[1]


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
    _check_not_dominant(ssd_scores(train, _probe(train), covariance=covariance))


@pytest.mark.parametrize("covariance", ["shrinkage", "pinv"])
def test_near_constant_channel_does_not_dominate(covariance):
    """Round-off noise (std ~1e-13 of the features' scale) is not a variance to standardise by."""
    train = _relu_like(2)
    train[:, 3] = 1e-12 * np.abs(np.random.default_rng(3).normal(size=len(train)))
    det = MahalanobisDetector(covariance=covariance).fit(train)
    _check_not_dominant(det.score(_probe(train)))
    _check_not_dominant(ssd_scores(train, _probe(train), covariance=covariance))


def test_standardization_scale_rule():
    std = np.array([0.2, 0.1, 0.0, 1e-9, 0.3])
    typical = np.sqrt(np.mean(std**2))
    scale = scoring.standardization_scale(std)
    np.testing.assert_array_equal(scale[[0, 1, 4]], std[[0, 1, 4]])  # ordinary features: their own std
    np.testing.assert_allclose(scale[[2, 3]], typical)  # (near-)constant: the features' typical scale
    assert scoring.standardization_scale(np.zeros(4)).tolist() == [1.0] * 4  # all constant: unscaled
    # the detector and the reference standardize (tests/reference.py) share the rule
    train = _relu_like(4)
    det = MahalanobisDetector().fit(train)
    np.testing.assert_allclose(det._standardize(train), standardize(train)[0], rtol=1e-12)
    assert det._standardize(train)[:, 3].tolist() == [0.0] * len(train)


def test_normal_data_is_standardised_as_before():
    """No (near-)constant feature: z = (x - mean) / std of the L2-normalised train set, scores = sklearn."""
    rng = np.random.default_rng(5)
    train, test = rng.normal(1, 1, (200, 6)), rng.normal(1, 2, (30, 6))
    ntr = train / np.linalg.norm(train, axis=1, keepdims=True)
    nte = test / np.linalg.norm(test, axis=1, keepdims=True)
    mu, sd = ntr.mean(0), ntr.std(0)
    ztr, zte = (ntr - mu) / sd, (nte - mu) / sd
    s_tr, s_te = standardize(train, test)
    np.testing.assert_allclose(s_tr, ztr, rtol=1e-8, atol=1e-9)  # atol: l2_normalize's norm + 1e-10
    np.testing.assert_allclose(s_te, zte, rtol=1e-8, atol=1e-9)
    ref = EmpiricalCovariance().fit(ztr).mahalanobis(zte)
    for cov in ("pinv", "empirical"):
        np.testing.assert_allclose(MahalanobisDetector(covariance=cov).fit(train).score(test), ref, rtol=1e-6)
        np.testing.assert_allclose(ssd_scores(train, test, covariance=cov), ref, rtol=1e-6)
