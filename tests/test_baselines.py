"""The other systems' scoring rules (issue 12) against hand-written references on tiny inputs."""
import numpy as np
import pytest

from cmg_core.errors import ConfigError, DataError


def test_bliss_rule_by_hand():
    """Two classes, three dictionary entries, k = 2, lambda = 0.5, worked out element by element."""
    from cmg_core.bliss import bliss_scores

    sim_c = np.array([[0.9, 0.1], [0.2, 0.3]])
    sim_d = np.array([[0.1, 0.5, 0.3], [0.9, 0.0, 0.6]])
    mu_c, sd_c = np.array([0.5, 0.2]), np.array([0.2, 0.1])
    mu_d, sd_d = np.array([0.2, 0.2, 0.2]), np.array([0.1, 0.1, 0.2])
    expected = []
    for i in range(2):
        internal = [-(sim_c[i, c] - mu_c[c]) / sd_c[c] for c in range(2)]
        z = sorted(((sim_d[i, j] - mu_d[j]) / sd_d[j] for j in range(3)), reverse=True)
        external = (z[0] + z[1]) / 2
        expected.append(min(v + 0.5 * external for v in internal))
    got = bliss_scores(sim_c, sim_d, mu_c, sd_c, mu_d, sd_d, k=2, weight=0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # image 0 matches class 0 far above the normal mean: its internal score is low (normal)
    assert got[0] < got[1]


def test_bliss_detector_fits_statistics_on_normal_images():
    from cmg_core.bliss import BLISSDetector, bliss_scores

    rng = np.random.default_rng(0)
    text = rng.normal(size=(2 + 6, 4))  # 2 class prompts, 6 dictionary entries
    normal = text[rng.integers(2, size=60)] + 0.3 * rng.normal(size=(60, 4))  # near the class prompts
    odd = text[2 + rng.integers(6, size=20)] + 0.3 * rng.normal(size=(20, 4))  # near dictionary entries
    det = BLISSDetector(text, n_classes=2, k=3, weight=0.5).fit(normal)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    s = unit(normal) @ unit(text).T
    np.testing.assert_allclose(det.mean_, s.mean(0), rtol=1e-8)  # l2_normalize adds 1e-10 to the norm
    t = unit(odd) @ unit(text).T
    ref = bliss_scores(t[:, :2], t[:, 2:], s.mean(0)[:2], s.std(0)[:2], s.mean(0)[2:], s.std(0)[2:], 3, 0.5)
    np.testing.assert_allclose(det.score(odd), ref, rtol=1e-6)
    assert np.median(det.score(odd)) > np.quantile(det.calibration_scores_, 0.9)  # anomalies score high
    back = BLISSDetector.from_state_dict(det.state_dict())
    np.testing.assert_allclose(back.score(odd), det.score(odd)) and back.threshold_ == det.threshold_
    top = det.top_entries(odd[:2], n=2)
    assert len(top) == 2 and all(w.startswith("#") for w, _ in top[0])  # unnamed entries: "#<row>"
    with pytest.raises(ConfigError, match="C \\+ J"):
        BLISSDetector(text, n_classes=8)


def test_bliss_dictionary_and_prompts(tmp_path):
    from cmg_core.bliss import class_prompts, load_dictionary

    words = load_dictionary()
    assert len(words) >= 500 and len(set(words)) == len(words) and all(w == w.strip() for w in words)
    assert class_prompts(["dense_residential", "beach"]) == ["This is a photo of a dense residential",
                                                             "This is a photo of a beach"]
    with pytest.raises(ConfigError, match="label"):
        class_prompts(["a"], "a photo")
    f = tmp_path / "words.txt"
    f.write_text("# my words\nriver\n\nbridge\n")
    assert load_dictionary(f) == ["river", "bridge"]
    with pytest.raises(DataError, match="does not exist"):
        load_dictionary(tmp_path / "nope.txt")


def test_she_rule_by_hand():
    from cmg_core.she import she_energy, she_patterns

    h = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    labels = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 0])  # the last image of class 1 is misclassified: not stored
    patterns = she_patterns(h, pred, labels, 2)
    np.testing.assert_allclose(patterns, [[2.0, 0.0], [0.0, 3.0]])
    test = np.array([[1.0, 1.0], [0.0, -1.0]])
    np.testing.assert_allclose(she_energy(test, np.array([0, 1]), patterns), [-2.0, 3.0])


def test_she_detector():
    from cmg_core.she import SHEDetector

    rng = np.random.default_rng(1)
    centres = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    labels = rng.integers(2, size=80)
    train = centres[labels] + rng.normal(size=(80, 3))
    w, b = centres.copy(), np.zeros(2)  # a classifier that separates the two classes
    det = SHEDetector(w, b).fit(train, labels)
    np.testing.assert_allclose(det.patterns_, [train[labels == c].mean(0) for c in (0, 1)], atol=0.5)
    far = rng.normal(size=(20, 3)) * 0.3  # near the origin: small inner product with either pattern
    assert np.median(det.score(far)) > det.threshold_
    back = SHEDetector.from_state_dict(det.state_dict())
    np.testing.assert_allclose(back.score(far), det.score(far))
    with pytest.raises(DataError, match="class labels"):
        SHEDetector(w, b).fit(train)
    with pytest.raises(ConfigError, match=">= 2 normal classes"):
        SHEDetector(w[:1], b[:1])


@pytest.fixture(scope="module")
def bliss_run(tmp_path_factory):
    from cmg_core.config import load_config
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    out = tmp_path_factory.mktemp("bliss")
    cfg = load_config("configs/synthetic.yaml", [f"out_dir={out}", "name=b", "data.options={n_per_class: 24, classes: 5}",
                                                 "task.normal_classes=[circle, square, triangle]", "e1.epochs=25",
                                                 "cmer.rid_epochs=5", "train.methods=[bliss, raw]"])
    return Run.open(train_run(cfg))


def test_bliss_method_in_a_run_and_the_predictor(bliss_run):
    """`bliss` scores E1's embeddings against the prompts of the normal class names and the dictionary; one score
    of its own (key `bliss`, no `@knn`), reproduced on new images by the Predictor from the run folder alone."""
    from cmg_core.predict import Predictor

    metrics = bliss_run.metrics()
    assert set(metrics) == {"bliss", "raw", "raw@knn"}
    assert metrics["bliss"]["auroc"] > 60  # E1 has learnt the shapes' captions: the class prompts match normals
    images = bliss_run.images()
    rows = np.r_[0:3, len(images) - 3:len(images)]
    pred = Predictor.load(bliss_run.path)
    res = pred.explain_many(list(images.path.values[rows]))
    np.testing.assert_allclose([r["scores"]["bliss"] for r in res], bliss_run.scores()["score_bliss"].values[rows],
                               rtol=1e-3, atol=1e-3)
    det = pred.detectors["bliss"]
    assert det.scorer == "bliss" and list(det.entries[:3]) == ["This is a photo of a circle",
                                                                "This is a photo of a square",
                                                                "This is a photo of a triangle"]
    assert len(det.entries) == 3 + 999


@pytest.mark.parametrize("profile", ["frozen", "end2end"])
def test_she_method_trains_a_classifier_and_scores_by_energy(tmp_path, profile):
    """`she` trains E2 with the classifier's cross-entropy on the normal classes (no contrastive term), stores one
    pattern per class and scores by energy against the predicted class's pattern; the Predictor reproduces it."""
    from cmg_core.config import load_config
    from cmg_core.predict import Predictor
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    over = [f"out_dir={tmp_path}", "name=s", "data.options={n_per_class: 16, classes: 4}",
            "task.normal_classes=[circle, square]", "e1.epochs=3", "cmer.rid_epochs=3", "e2.epochs=3",
            "e2.n_views=2", "train.methods=[she]"]
    if profile == "end2end":
        over += ["model.profile=end2end", "data.image_size=32", "model.trunk_image_size=64", "model.backbone=cnn",
                 "e2.batch_size=8", "train.eval_every_epoch=false"]
    run = Run.open(train_run(load_config("configs/synthetic.yaml", over)))
    assert set(run.metrics()) == {"she"}
    e2 = run.history().query("stage == 'e2'")
    assert (e2.ce > 0).all() and (e2.simclr == 0).all()
    pred = Predictor.load(run.path)
    det = pred.detectors["she"]
    assert det.scorer == "she" and det.patterns_.shape[0] == 2 and det.weight.shape[0] == 2
    images = run.images()
    res = pred.explain_many(list(images.path[:3]))
    np.testing.assert_allclose([r["scores"]["she"] for r in res], run.scores().score_she.values[:3], rtol=1e-3,
                               atol=1e-3)


def test_she_needs_two_normal_classes(tmp_path):
    from cmg_core.config import load_config
    from cmg_core.train import train_run

    cfg = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=s1", "data.options={n_per_class: 12, classes: 3}",
                                                 "task.normal_classes=[circle]", "e1.epochs=2", "cmer.rid_epochs=2",
                                                 "train.methods=[she]"])
    with pytest.raises(ConfigError, match=">= 2 normal classes"):
        train_run(cfg)
