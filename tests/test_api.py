"""The Python API (cmg_core.CMG, SSD, ...): fit, decision_function, predict, explain, save, load."""
import json
import subprocess
import sys

import numpy as np
import pytest

import cmg_core
from cmg_core import SSD, Detector
from cmg_core.errors import ConfigError, DataError

SMALL = ["data.options={n_per_class: 30, classes: 4}", "task.normal_classes=[circle, square]",
         "e1.epochs=10", "cmer.rid_epochs=10", "e2.epochs=2", "e2.n_views=2", "model.head_hidden=64"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    det = SSD("configs/synthetic.yaml", run_dir=out / "ssd_run", overrides=SMALL, detector={"fpr": 0.1})
    return det.fit(), out


def test_fit_scores_like_the_run_folder(fitted):
    det, _ = fitted
    assert det.run_dir_.is_dir() and det.predictor_.methods == ["ssd", "ssd@knn"]
    assert det.metrics_["auroc"] > 50 and 0 <= det.metrics_["flagged_normal"] <= 100
    assert det.predictor_.detectors["ssd"].fpr == 0.1  # the section keyword reached the config
    images = det.predictor_.run.images()
    paths = list(images.path[:5])
    scores = det.decision_function(paths, batch_size=2)
    stored = det.predictor_.run.scores()["score_ssd"].values[:5]
    np.testing.assert_allclose(scores, stored, rtol=1e-3, atol=1e-3)
    flags = det.predict(paths)
    assert set(flags) <= {0, 1} and np.array_equal(flags, (scores > det.threshold_).astype(int))
    res = det.explain(paths[0])
    assert res["score"] == pytest.approx(scores[0], rel=1e-4) and "expected 10 %" in res["threshold_meaning"]


def test_knn_scorer_of_the_same_run(fitted):
    """SSD(scorer="knn") is the same run's features under the k-NN score, with its own calibrated threshold."""
    det, _ = fitted
    knn = SSD.load(det.run_dir_, scorer="knn")
    assert knn.key == "ssd@knn" and knn.threshold_ == knn.predictor_.detectors["ssd@knn"].threshold_
    paths = list(knn.predictor_.run.images().path[:4])
    stored = knn.predictor_.run.scores()["score_ssd@knn"].values[:4]
    np.testing.assert_allclose(knn.decision_function(paths), stored, rtol=1e-3, atol=1e-4)
    assert knn.metrics_ == knn.predictor_.run.metrics()["ssd@knn"]
    with pytest.raises(ConfigError, match="scorer='lof'"):
        SSD(scorer="lof")


def test_save_and_load_in_a_new_process(fitted, tmp_path):
    det, _ = fitted
    saved = det.save(tmp_path / "saved")
    assert not any((saved / "checkpoints").iterdir())
    with pytest.raises(DataError, match="exists"):
        det.save(saved)
    paths = list(det.predictor_.run.images().path[-3:])
    code = ("import json, sys; from cmg_core import SSD; d = SSD.load(sys.argv[1]); "
            "print(json.dumps(d.decision_function(sys.argv[2:]).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(saved), *paths], capture_output=True, text=True, check=True)
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]), det.decision_function(paths),
                               rtol=1e-6)


def test_unfitted_and_wrong_inputs_give_clear_errors(fitted):
    det, _ = fitted
    with pytest.raises(ConfigError, match="not fitted"):
        SSD().decision_function(["x.png"])
    with pytest.raises(DataError, match="no method 'cmg'"):
        Detector.load(det.run_dir_, method="cmg")
    with pytest.raises(DataError, match=r"expected a folder path, a list of image paths, .*or a data-section dict; got int"):
        SSD().make_config(42)
    with pytest.raises(ConfigError, match="expects a dict"):
        SSD(e2=3).make_config()
    assert "not fitted" in repr(SSD()) and "fitted" in repr(det)


def test_package_exports_the_api():
    assert {"CMG", "SSD", "Predictor", "MahalanobisDetector", "load_config", "train_run"} <= set(cmg_core.__all__)
    assert cmg_core.CMG.method == "cmg" and cmg_core.SSD is SSD
    with pytest.raises(AttributeError):
        cmg_core.nothing_here


def _normal_only_imagefolder(root, n=36, seed=0):
    """A Hugging Face imagefolder of one class: coloured discs on a plain background, one caption each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
    rows = []
    (root / "train").mkdir(parents=True)
    for i in range(n):
        name = list(colours)[i % 3]
        img = Image.new("RGB", (64, 64), (235, 235, 225))
        x, y, r = rng.integers(18, 46), rng.integers(18, 46), rng.integers(8, 14)
        ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=colours[name])
        img.save(root / "train" / f"{i:03d}.png")
        rows.append({"file_name": f"train/{i:03d}.png", "text": f"a {name} disc on a pale background"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_class_imagefolder_through_the_api(tmp_path):
    """Normal images only, in the imagefolder layout: CMG fits (no anomalies: no AUROC, only the share of
    held-out normal images flagged), saves, loads and scores new images."""
    from PIL import Image

    from cmg_core.data import load_dataset

    data = tmp_path / "normal_only"
    _normal_only_imagefolder(data)
    ds = load_dataset("folder", root=data)
    assert ds.class_names == ["normal_only"] and ds.items[0].captions[0].startswith("a ")
    det = cmg_core.CMG("configs/synthetic.yaml", run_dir=tmp_path / "run",
                       overrides=["e1.epochs=5", "cmer.rid_epochs=5", "e2.epochs=2", "e2.n_views=2",
                                  "model.head_hidden=64", "cmle.n_clusters=3", "data.image_size=64"],
                       task={"normal_classes": None, "n_normal": None}).fit(str(data))
    assert "auroc" not in det.metrics_ and 0 <= det.metrics_["flagged_normal"] <= 100
    assert det.metrics_["flagged_anomaly"] is None
    saved = det.save(tmp_path / "saved")
    new = tmp_path / "new"
    new.mkdir()
    Image.new("RGB", (80, 60), (20, 20, 20)).save(new / "dark.png")
    Image.open(data / "train" / "000.png").save(new / "like_train.png")
    paths = [str(new / "dark.png"), str(new / "like_train.png")]
    loaded = cmg_core.CMG.load(saved)  # in a new process: test_save_and_load_in_a_new_process
    scores, flags = loaded.decision_function(paths), loaded.predict(paths)
    assert np.isfinite(scores).all() and set(flags.tolist()) <= {0, 1}
    assert scores[0] > scores[1]  # a dark blank image is further from the normal discs than one of them
