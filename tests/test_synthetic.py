"""Tests for the embedded synthetic dataset (cmg_core.data.synthetic)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cmg_core.data import load_dataset
from cmg_core.data import synthetic as syn
from cmg_core.data import synthetic_render as render
from cmg_core.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder."""
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))


def _connected(mask: np.ndarray) -> bool:
    """True when the True pixels of `mask` form one 8-connected component."""
    seed = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    seed[ys[0], xs[0]] = True
    while True:
        p = np.pad(seed, 1)
        grown = np.zeros_like(seed)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= p[dy:dy + seed.shape[0], dx:dx + seed.shape[1]]
        grown &= mask
        if (grown == seed).all():
            return bool((seed == mask).all())
        seed = grown


def test_counts_captions_files_and_splits(tmp_path):
    ds = syn.load_synthetic(tmp_path / "ds", n_per_class=6, size=64)
    assert len(ds) == 60 and ds.num_classes == 10 and ds.class_names == syn.CLASSES
    assert len(syn.CLASSES) >= 8
    for it in ds.items:
        assert len(it.captions) == 5 and len(set(it.captions)) == 5
        assert re.fullmatch(rf"{it.class_name}/{it.class_name}_\d{{3}}", it.image_id)
        assert it.path.suffix == ".png" and it.path.is_file()
    with Image.open(ds.items[0].path) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    for c in range(10):
        splits = [it.split for it in ds.items if it.class_id == c]
        assert splits.count("train") == 4 and splits.count("val") == 1 and splits.count("test") == 1
    m = ds.meta
    assert m["generator_version"] == syn.GENERATOR_VERSION
    assert m["object_boxes"].shape == (60, 4) and m["object_boxes"].dtype.kind == "i"
    assert len(m["object_colors"]) == 60 and set(m["object_colors"]) <= set(render.PALETTE)


def test_default_split_is_80_10_10():
    ds = syn.load_synthetic(n_per_class=20, size=32, classes=2)
    for c in range(2):
        splits = [it.split for it in ds.items if it.class_id == c]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (16, 2, 2)


def test_deterministic_bytes_and_seed_changes_images(tmp_path):
    kw = dict(n_per_class=3, size=64, classes=3)
    a = syn.load_synthetic(tmp_path / "a", seed=5, **kw)
    b = syn.load_synthetic(tmp_path / "b", seed=5, **kw)
    c = syn.load_synthetic(tmp_path / "c", seed=6, **kw)
    for i in (0, 4, 8):
        assert a.items[i].path.read_bytes() == b.items[i].path.read_bytes()
        assert a.items[i].captions == b.items[i].captions
        assert a.items[i].path.read_bytes() != c.items[i].path.read_bytes()
    assert np.array_equal(a.meta["object_boxes"], b.meta["object_boxes"])
    assert [it.captions for it in a.items] != [it.captions for it in c.items]


def test_fewer_classes_give_the_same_images(tmp_path):
    full = syn.load_synthetic(tmp_path / "full", n_per_class=2, size=48)
    sub = syn.load_synthetic(tmp_path / "sub", n_per_class=2, size=48, classes=3)
    assert sub.class_names == syn.CLASSES[:3] and len(sub) == 6
    for i in range(6):
        assert sub.items[i].path.read_bytes() == full.items[i].path.read_bytes()


def test_second_call_reuses_cache(monkeypatch):
    first = syn.load_synthetic(n_per_class=3, size=48, classes=2)
    assert first.root.parent.name == "synthetic" and f"v{syn.GENERATOR_VERSION}" in first.root.name
    mtimes = {p: p.stat().st_mtime_ns for p in first.paths}

    def boom(*a, **k):
        raise AssertionError("cached dataset was re-rendered")

    monkeypatch.setattr(syn, "render_image", boom)
    second = syn.load_synthetic(n_per_class=3, size=48, classes=2)
    assert second.root == first.root and [it.captions for it in second.items] == [it.captions for it in first.items]
    assert {p: p.stat().st_mtime_ns for p in second.paths} == mtimes
    # a different parameter set is a different cache entry, so it must render
    with pytest.raises(AssertionError, match="re-rendered"):
        syn.load_synthetic(n_per_class=4, size=48, classes=2)


def test_interrupted_generation_leaves_no_valid_cache(monkeypatch, tmp_path):
    real, calls = syn.render_image, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed midway")
        return real(*a, **k)

    monkeypatch.setattr(syn, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        syn.load_synthetic(n_per_class=4, size=48, classes=2)
    parent = tmp_path / "cache" / "synthetic"
    assert list(parent.iterdir()) == []  # neither the final folder nor a temporary one remains
    monkeypatch.setattr(syn, "render_image", real)
    ds = syn.load_synthetic(n_per_class=4, size=48, classes=2)
    assert len(ds) == 8 and all(p.is_file() for p in ds.paths)


def test_hard_kill_leaves_only_a_temporary_folder(monkeypatch, tmp_path):
    """A killed process runs no cleanup: the half-written set must never sit at the final path."""
    real, calls = syn.render_image, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise SystemExit("killed")
        return real(*a, **k)

    monkeypatch.setattr(syn, "render_image", flaky)
    monkeypatch.setattr(syn.shutil, "rmtree", lambda *a, **k: None)  # no cleanup, as after SIGKILL
    with pytest.raises(SystemExit):
        syn.load_synthetic(n_per_class=4, size=48, classes=2)
    monkeypatch.undo()
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    parent = tmp_path / "cache" / "synthetic"
    leftovers = list(parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and ".tmp-" in leftovers[0].name
    assert not (leftovers[0] / "manifest.json").exists()
    ds = syn.load_synthetic(n_per_class=4, size=48, classes=2)
    assert len(ds) == 8 and all(p.is_file() for p in ds.paths) and not ds.root.name.startswith(".")


@pytest.mark.parametrize("damage", ["no_manifest", "bad_json", "missing_png", "old_version"])
def test_folder_without_valid_manifest_is_regenerated(damage):
    ds = syn.load_synthetic(n_per_class=3, size=48, classes=2)
    man = ds.root / "manifest.json"
    if damage == "no_manifest":
        man.unlink()
    elif damage == "bad_json":
        man.write_text(man.read_text()[:100])
    elif damage == "missing_png":
        ds.paths[2].unlink()
    else:
        data = json.loads(man.read_text())
        data["generator_version"] = syn.GENERATOR_VERSION - 1
        man.write_text(json.dumps(data))
    again = syn.load_synthetic(n_per_class=3, size=48, classes=2)
    assert len(again) == 6 and all(p.is_file() for p in again.paths)
    assert json.loads(man.read_text())["generator_version"] == syn.GENERATOR_VERSION
    assert [p.name for p in again.root.parent.iterdir()] == [again.root.name]


def test_captions_name_colour_and_class_synonym_only():
    ds = syn.load_synthetic(n_per_class=8, size=32)
    background_words = ("stripe", "checker", "noise", "gradient", "texture", "background")
    for it, color in zip(ds.items, ds.meta["object_colors"]):
        others = [s for c, ss in render.SYNONYMS.items() if c != it.class_name for s in ss]
        for cap in it.captions:
            assert re.search(rf"\b{color}\b", cap), cap
            assert any(re.search(rf"\b{re.escape(s)}\b", cap) for s in render.SYNONYMS[it.class_name]), cap
            assert not any(re.search(rf"\b{re.escape(s)}\b", cap) for s in others), cap
            assert not any(w in cap for w in background_words), cap
            assert not re.search(r"\ba [aeiou]", cap), cap
    used = {s for it in ds.items if it.class_name == "star" for cap in it.captions for s in render.SYNONYMS["star"] if s in cap}
    assert len(used) >= 3  # synonyms really vary


def test_object_region_fraction_hand_made_boxes():
    f = syn.object_region_fraction
    np.testing.assert_allclose(f([[0, 0, 64, 64]], 128, 2), [[1, 0, 0, 0]])
    np.testing.assert_allclose(f([[64, 0, 128, 64]], 128, 2), [[0, 1, 0, 0]])  # row-major: top right = 1
    np.testing.assert_allclose(f([[0, 64, 64, 128]], 128, 2), [[0, 0, 1, 0]])
    np.testing.assert_allclose(f([[32, 32, 96, 96]], 128, 2), [[0.25] * 4])
    np.testing.assert_allclose(f([[0, 30, 30, 60]], 90, 3), [[0, 0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(f([[60, 75, 90, 90]], 90, 3)[0, 8], 0.5)  # half of the bottom-right cell
    out = f([[10, 10, 70, 40], [0, 0, 100, 100], [5, 5, 5, 50]], 100, 3)
    assert out.shape == (3, 9)
    np.testing.assert_allclose(out[1], np.ones(9))
    np.testing.assert_allclose(out[2], np.zeros(9))  # zero-width box covers nothing
    np.testing.assert_allclose(out[0, :3], [(100 / 3 - 10) * (100 / 3 - 10) / (100 / 3) ** 2,
                                            (100 / 3) * (100 / 3 - 10) / (100 / 3) ** 2,
                                            (70 - 200 / 3) * (100 / 3 - 10) / (100 / 3) ** 2])
    box = f([[10, 10, 70, 40]], 100, 3, of="box")
    np.testing.assert_allclose(box.sum(1), [1.0])
    np.testing.assert_allclose(box[0, 0], (100 / 3 - 10) ** 2 / (60 * 30))
    with pytest.raises(DataError):
        f([[0, 0, 1, 1]], 10, 2, of="pixels")


def test_one_object_per_image_within_two_quadrants():
    ds = syn.load_synthetic(n_per_class=4, size=128)
    boxes, size = ds.meta["object_boxes"], 128
    for i, it in enumerate(ds.items):
        ci, idx = syn.CLASSES.index(it.class_name), int(it.image_id.rsplit("_", 1)[1])
        with_obj, info = syn.render_image(0, ci, idx, size)
        without, _ = syn.render_image(0, ci, idx, size, with_object=False)
        assert np.array_equal(np.asarray(Image.open(it.path)), with_obj)
        assert list(info["box"]) == list(boxes[i])
        diff = np.abs(with_obj.astype(int) - without.astype(int)).max(2) > 0
        x0, y0, x1, y1 = boxes[i]
        inside = np.zeros_like(diff)
        inside[y0:y1, x0:x1] = True
        assert diff.any() and not (diff & ~inside).any(), it.image_id  # only the object changed pixels
        assert diff[y0:y1, x0:x1].mean() > 0.2, it.image_id
        strong = np.abs(with_obj.astype(int) - without.astype(int)).max(2) > 40
        assert _connected(strong), it.image_id  # a single object, clearly visible
        q = np.sort(syn.object_region_fraction(boxes[i:i + 1], size, 2, of="box")[0])[::-1]
        assert q[:2].sum() >= 0.9, (it.image_id, q)
        assert 0.12 * size <= max(x1 - x0, y1 - y0) <= 0.42 * size
    cover3 = syn.object_region_fraction(boxes, size, 3)
    assert (cover3 == 0).mean() > 0.5  # most 3x3 regions are background-only
    assert ((syn.object_region_fraction(boxes, size, 2) == 0).sum(1) >= 2).all()


def test_registry_and_validation(tmp_path):
    ds = load_dataset("synthetic", n_per_class=5)
    assert len(ds) == 50 and ds.name == "synthetic"
    for bad in (dict(classes=1), dict(classes=11), dict(n_per_class=0), dict(size=8), dict(seed=-1), dict(foo=1)):
        with pytest.raises(DataError):
            syn.load_synthetic(tmp_path / "x", **bad)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="non-empty"):
        syn.load_synthetic(foreign, n_per_class=2, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
