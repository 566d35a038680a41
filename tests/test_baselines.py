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
                                                 "task.normal_classes=[circle, square, triangle]", "e1.epochs=10",
                                                 "cmer.rid_epochs=5", "e2.epochs=2", "e2.n_views=2",
                                                 "train.methods=[bliss, raw, she, cmda]", "cmda.neighbors=3"])
    return Run.open(train_run(cfg))


def test_bliss_method_in_a_run_and_the_predictor(bliss_run):
    """`bliss` scores E1's embeddings against the prompts of the normal class names and the dictionary; one score
    of its own (key `bliss`, no `@knn`), reproduced on new images by the Predictor from the run folder alone."""
    from cmg_core.predict import Predictor

    metrics = bliss_run.metrics()
    assert set(metrics) == {"bliss", "raw", "raw@knn", "she", "cmda", "cmda@knn"}
    assert 0 <= metrics["bliss"]["auroc"] <= 100  # the rule itself is checked by hand above; this is the plumbing
    assert metrics["bliss"]["threshold"] == pytest.approx(Predictor.load(bliss_run.path).detectors["bliss"].threshold_)
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


def test_she_needs_two_normal_classes(tmp_path):
    from cmg_core.config import load_config
    from cmg_core.train import train_run

    cfg = load_config("configs/synthetic.yaml", [f"out_dir={tmp_path}", "name=s1", "data.options={n_per_class: 12, classes: 3}",
                                                 "task.normal_classes=[circle]", "e1.epochs=2", "cmer.rid_epochs=2",
                                                 "train.methods=[she]"])
    with pytest.raises(ConfigError, match=">= 2 normal classes"):
        train_run(cfg)


def test_bliss_through_the_python_api(bliss_run):
    from cmg_core import BLISS, RawKNN

    det = BLISS.load(bliss_run.path)
    assert det.key == "bliss" and det.threshold_ == det.predictor_.detectors["bliss"].threshold_
    paths = list(bliss_run.images().path[:3])
    np.testing.assert_allclose(det.decision_function(paths), bliss_run.scores().score_bliss.values[:3], rtol=1e-3,
                               atol=1e-3)
    assert RawKNN.load(bliss_run.path).key == "raw@knn"
    with pytest.raises(ConfigError, match="scorer='knn'"):
        BLISS(scorer="knn")


def test_bliss_with_a_local_clip(tiny_clip, tmp_path):
    """With `bliss.clip_model` / `bliss.clip_weights`, BLISS embeds images and prompts with that CLIP (open_clip,
    local weights): the run stores no CLIP weights, and the Predictor reproduces its scores from the run folder."""
    from cmg_core.artifacts import load_model, model_path
    from cmg_core.config import load_config
    from cmg_core.encoders.clip import CLIPEncoder
    from cmg_core.predict import Predictor
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    arch, weights = tiny_clip
    sets = [f"out_dir={tmp_path}", "name=c", "data.options={n_per_class: 8, classes: 4}",
            "task.normal_classes=[circle, square]", "e1.epochs=2", "cmer.rid_epochs=2", "train.methods=[bliss]",
            f"bliss.clip_model={arch}", f"bliss.clip_weights={weights}"]
    run = Run.open(train_run(load_config("configs/synthetic.yaml", sets)))
    pred = Predictor.load(run.path)
    det = pred.detectors["bliss"]
    clip = CLIPEncoder(str(arch), str(weights), device="cpu")
    assert det.text.shape == (2 + 999, 16)  # CLIP's joint space, not the text model's
    np.testing.assert_allclose(det.text[:2], clip.encode_texts(["This is a photo of a circle",
                                                                "This is a photo of a square"]), atol=1e-5)
    assert load_model(model_path(run.path / "models", "bliss"))[0] == {}
    paths = list(run.images().path[:4])
    np.testing.assert_allclose(pred.score(paths, "bliss"), run.scores()["score_bliss"].values[:4], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ConfigError, match="needs both"):
        load_config("configs/synthetic.yaml", [f"bliss.clip_model={arch}"])
    with pytest.raises(ConfigError, match="clip_weights"):
        CLIPEncoder(str(arch), str(tmp_path / "missing.pt"))


def test_cmda_partners_and_mixing_by_hand():
    import torch

    from cmg_core.cmda import cmda_partners, draw_partners, mix

    s = np.array([[1.0, 0.8, -0.2, 0.5],
                  [0.3, 1.0, 0.9, 0.1],
                  [0.2, 0.4, 1.0, 0.6],
                  [0.7, 0.0, 0.1, 1.0]])
    partners, weights = cmda_partners(s, k=2, max_mix=0.5)
    np.testing.assert_array_equal(partners, [[1, 3], [2, 0], [3, 1], [0, 2]])  # never itself, best match first
    np.testing.assert_allclose(weights, [[0.4, 0.25], [0.45, 0.15], [0.3, 0.2], [0.35, 0.05]])
    assert cmda_partners(s, k=10, max_mix=0.5)[0].shape == (4, 3)  # k capped at N - 1
    np.testing.assert_allclose(cmda_partners(np.array([[1.0, -0.5], [-0.5, 1.0]]), 1, 1.0)[1], 0)  # clipped at 0
    x, p = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    out = mix(x, p, torch.tensor([0.25, 0.5]))
    assert torch.allclose(out[0], torch.full((3, 2, 2), 0.75)) and torch.allclose(out[1], torch.full((3, 2, 2), 0.5))
    j, w = draw_partners(torch.as_tensor(partners), torch.as_tensor(weights), torch.tensor([0, 2]),
                         torch.Generator().manual_seed(0))
    assert j[0].item() in (1, 3) and j[1].item() in (3, 1) and w.shape == (2,)
    with pytest.raises(ConfigError, match="max_mix"):
        cmda_partners(s, 2, 1.5)


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """she and cmda with E2 trained end to end (a small CNN on 32 px images); E1 a head on the frozen trunk."""
    from cmg_core.config import load_config
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    out = tmp_path_factory.mktemp("e2e_baselines")
    over = [f"out_dir={out}", "name=e", "data.options={n_per_class: 16, classes: 4}",
            "task.normal_classes=[circle, square]", "e1.epochs=3", "cmer.rid_epochs=3", "e2.epochs=2",
            "train.methods=[ssd, she, cmda]", "cmda.neighbors=3", "model.profile=end2end", "data.image_size=32",
            "model.trunk_image_size=64", "model.backbone=cnn", "e2.batch_size=8", "train.eval_every_epoch=false"]
    return Run.open(train_run(load_config("configs/synthetic.yaml", over)))


@pytest.mark.parametrize("fixture", ["bliss_run", "e2e_run"])
def test_she_trains_a_classifier_and_scores_by_energy(request, fixture):
    """`she` trains E2 with the classifier's cross-entropy on the normal classes (no contrastive term), stores one
    pattern per class and scores by energy against the predicted class's pattern; the Predictor reproduces it."""
    from cmg_core.predict import Predictor

    run = request.getfixturevalue(fixture)
    e2 = run.history().query("stage == 'e2' and method == 'she'")
    assert (e2.ce > 0).all() and (e2.simclr == 0).all()
    pred = Predictor.load(run.path)
    det = pred.detectors["she"]
    assert det.scorer == "she" and det.patterns_.shape[0] == det.weight.shape[0] == len(run.info["normal_classes"])
    res = pred.explain_many(list(run.images().path[:3]))
    np.testing.assert_allclose([r["scores"]["she"] for r in res], run.scores().score_she.values[:3], rtol=1e-3,
                               atol=1e-3)


@pytest.mark.parametrize("fixture", ["bliss_run", "e2e_run"])
def test_cmda_trains_on_mixed_views(request, fixture):
    """cmda: SimCLR on views mixed with caption-matched partners (trunk features in the frozen profile, pixels end
    to end) plus the small alignment term; scored like SSD (Mahalanobis and k-NN)."""
    run = request.getfixturevalue(fixture)
    assert {"cmda", "cmda@knn"} <= set(run.metrics())
    assert "CMDA: 3 partners per image" in run.log_tail(200)
    e2 = run.history().query("stage == 'e2' and method == 'cmda'")
    assert (e2.simclr > 0).all() and (e2.mse > 0).all() and (e2.ce == 0).all()
    if fixture == "e2e_run":
        ssd = run.history().query("stage == 'e2' and method == 'ssd'")
        assert not np.allclose(e2.simclr.values, ssd.simclr.values)  # mixed views, not SSD's


def test_language_explainer_by_hand(tmp_path):
    """Trunk features map linearly onto caption embeddings; an image is explained by the captions, words and cluster
    nearest to its point in the text space."""
    from cmg_core.language import LanguageExplainer, build_explainer

    rng = np.random.default_rng(0)
    text = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # (3, T=3): red, green, blue
    a = rng.normal(size=(8, 3))  # trunk (F=8) -> text (T=3) is x @ a
    cap_mean = np.repeat(text[:2], 10, axis=0) + 0.01 * rng.normal(size=(20, 3))
    trunk = cap_mean @ np.linalg.pinv(a)
    captions = [["a red thing"]] * 10 + [["a green thing"]] * 10
    from cmg_core.train.untrained import text_space_map

    lin = text_space_map(trunk, cap_mean, alpha=1e-6)
    exp = build_explainer(lin.weight.detach().numpy(), lin.bias.detach().numpy(), cap_mean, captions,
                          cap_mean[:, None, :], np.repeat([0, 1], 10), ["red", "green", "blue"], text[:3])
    assert list(exp.captions) == ["a red thing", "a green thing"]  # unique captions kept
    new = np.array([1.0, 0.05, 0.0]) @ np.linalg.pinv(a)
    res = exp.explain(new[None], n=2)[0]
    assert res["captions"][0][0] == "a red thing" and res["captions"][0][1] > 0.99
    assert res["words"][0][0] == "red" and res["cluster"][0] == 0 and res["cluster"][2] == "a red thing"
    exp.save(tmp_path / "language.npz")
    back = LanguageExplainer.load(tmp_path / "language.npz")
    assert back.explain(new[None], n=2)[0]["captions"][0][0] == "a red thing"


def test_runs_explain_verdicts_in_words(bliss_run):
    from cmg_core import BLISS
    from cmg_core.predict import Predictor

    assert (bliss_run.path / "language.npz").is_file()
    res = Predictor.load(bliss_run.path).explain(bliss_run.images().path.iloc[0])
    words = res["language"]
    assert len(words["captions"]) == 3 and all(-1 <= s <= 1 for _, s in words["captions"])
    assert len(words["words"]) == 3 and isinstance(words["cluster"][2], str)
    assert BLISS.load(bliss_run.path).explain(bliss_run.images().path.iloc[0])["language"] == words
