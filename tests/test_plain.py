"""Plain image folders (no captions) and runs that do only what their methods need (issue 19)."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cmg_core import CMG, SSD, RawKNN
from cmg_core.data import load_dataset
from cmg_core.data.folder import load_folder
from cmg_core.errors import DataError
from cmg_core.methods import REGISTRY, method_choices, parse_method, run_needs

FAST = ["e2.epochs=2", "e2.n_views=2", "model.head_hidden=32", "data.image_size=32"]


def disc_images(folder, n, seed=0, colour=(220, 40, 40)):
    """n 48x48 PNGs of a disc on a pale background (small and cheap to read)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (48, 48), (235, 235, 225))
        x, y, r = rng.integers(14, 34), rng.integers(14, 34), rng.integers(6, 12)
        ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=colour)
        img.save(folder / f"{i:03d}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain") / "my_images"
    disc_images(root, 24)
    return root


def test_flat_folder_is_one_uncaptioned_class(flat):
    ds = load_dataset("folder", root=flat)
    assert ds.class_names == ["my_images"] and len(ds) == 24 and not ds.has_captions
    assert ds.items[0].captions == () and ds.meta["layout"] == "plain"


def test_class_and_split_folders(tmp_path):
    disc_images(tmp_path / "train" / "red", 3)
    disc_images(tmp_path / "train" / "blue", 2, colour=(40, 70, 220))
    disc_images(tmp_path / "test" / "red", 1)
    (tmp_path / ".hidden").mkdir()
    disc_images(tmp_path / ".hidden", 2)
    ds = load_folder(tmp_path)
    assert ds.class_names == ["blue", "red"] and len(ds) == 6
    assert sorted(it.split for it in ds.items) == ["test"] + ["train"] * 5


def test_images_folder_without_captions_is_plain(tmp_path):
    disc_images(tmp_path / "Images" / "cat", 2)
    disc_images(tmp_path / "Images" / "dog", 2)
    ds = load_folder(tmp_path)
    assert ds.class_names == ["cat", "dog"] and not ds.has_captions


def test_empty_folder_and_listed_files(tmp_path):
    with pytest.raises(DataError, match="no image files in"):
        load_folder(tmp_path)
    paths = disc_images(tmp_path / "a", 2) + disc_images(tmp_path / "b" / "c", 2)
    ds = load_folder(tmp_path, files=[str(p) for p in paths[:3]])
    assert len(ds) == 3 and ds.num_classes == 1 and ds.class_names == [tmp_path.name]
    with pytest.raises(DataError, match="not image files"):
        load_folder(tmp_path, files=[str(tmp_path / "missing.png")])


def test_registry_is_the_one_list_of_methods():
    assert set(REGISTRY) == {parse_method(m).base for m in method_choices()}
    assert {"raw", "cmda", "she", "bliss", "cmg[lle]", "cmg[supcon]"} <= set(method_choices())
    assert run_needs([parse_method("raw"), parse_method("ssd")]) == set()
    assert run_needs([parse_method("cmg")]) == {"captions", "e1", "rid"}
    assert run_needs([parse_method("ssd+le")]) == {"captions"}


@pytest.fixture(scope="module")
def raw_fit(flat, tmp_path_factory):
    return RawKNN(run_dir=tmp_path_factory.mktemp("rawfit") / "run", overrides=FAST).fit(flat)


def test_raw_on_a_flat_folder_runs_only_what_it_needs(raw_fit, flat):
    run = raw_fit.run_dir_
    info = json.loads((run / "run.json").read_text())
    assert set(info["stage_seconds"]) == {"data", "trunk", "e2 raw"}  # no text, E1, CMER, RID, language
    assert sorted(p.name for p in (run / "models").iterdir()) == ["raw.npz"]
    assert not any((run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else True
    assert not (run / "cmer.csv").exists() and not (run / "language.npz").exists()
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert size < 2_000_000, size  # 24 images of D = 1280: Mahalanobis stores a factor, not a (D, D) precision
    det = raw_fit.predictor_.detectors["raw"]
    assert hasattr(det, "factors_") and not hasattr(det, "precisions_")
    pred = raw_fit.predictor_
    assert pred.rid is None
    res = pred.explain(str(next(flat.glob("*.png"))))
    assert res["rid_choice"] is None and res["masked_image"] is None and np.isfinite(res["scores"]["raw@knn"])
    flags = raw_fit.predict([str(p) for p in sorted(flat.glob("*.png"))[:4]])
    assert set(flags.tolist()) <= {0, 1}


def test_predictor_of_a_run_without_rid_reproduces_its_scores(raw_fit):
    import pandas as pd

    run = raw_fit.run_dir_
    scores = pd.read_csv(run / "scores.csv")
    images = pd.read_csv(run / "images.csv")
    got = raw_fit.decision_function(list(images.path[:6]))
    np.testing.assert_allclose(got, scores["score_raw@knn"].values[:6], rtol=1e-4, atol=1e-5)


def test_ssd_trains_on_plain_images_and_cmg_says_what_it_needs(flat, tmp_path):
    det = SSD(run_dir=tmp_path / "ssd", overrides=FAST).fit([str(p) for p in sorted(flat.glob("*.png"))])
    info = json.loads((det.run_dir_ / "run.json").read_text())
    assert "text" not in info["stage_seconds"] and "rid" not in info["stage_seconds"]
    assert np.isfinite(det.decision_function([str(next(flat.glob("*.png")))])).all()
    needs = r"need captions.*captions\.csv.*metadata\.jsonl.*no captions are \['ssd', 'raw', 'she'\]"
    with pytest.raises(DataError, match=needs):
        CMG(run_dir=tmp_path / "cmg", overrides=FAST).fit(flat)


def test_fit_and_score_arrays(tmp_path, monkeypatch):
    """fit(arrays) in the PyOD shape: a uint8 batch is stored once as PNGs in the cache and trains like the same
    images given as files; decision_function takes arrays, floats in [0, 1] and PIL images alike."""
    from cmg_core.data.arrays import stored_array_images

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    paths = disc_images(tmp_path / "discs", 12, seed=3)
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (12, 48, 48, 3) uint8
    det = RawKNN(run_dir=tmp_path / "arr", overrides=FAST).fit(x)
    stored = stored_array_images(x)
    assert stored == stored_array_images(list(x))  # content-addressed: the same pixels, the same files
    assert [np.asarray(Image.open(p)).tolist() == a.tolist() for p, a in zip(stored, x)] == [True] * 12
    by_files = RawKNN(run_dir=tmp_path / "files", overrides=FAST).fit([str(p) for p in paths])
    np.testing.assert_allclose(det.decision_function(x[:4]), by_files.decision_function([str(p) for p in paths[:4]]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.decision_function(x[:3] / 255.0), det.decision_function(x[:3]), rtol=1e-5)
    assert det.predict([x[0], Image.open(paths[1]), str(paths[2])]).shape == (3,)
    for bad, why in ((x[..., :2], "shape"), (x * 2.0, "outside"), (x.astype(np.int64), "dtype"),
                     (np.zeros((0, 8, 8, 3), np.uint8), "shape")):
        with pytest.raises(DataError, match=why):
            RawKNN(run_dir=tmp_path / "bad", overrides=FAST).fit(bad)
