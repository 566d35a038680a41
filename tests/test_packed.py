"""Packed datasets: `cmg data pack` writes one file, the `packed` loader reads it back identically."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from cmg_core.cli import main as cli_main
from cmg_core.data import CaptionedDataset, load_dataset, pack_dataset, read_packed_meta
from cmg_core.data.images import load_rgb
from cmg_core.data.packed import FORMAT_VERSION, pseudo_path
from cmg_core.encoders import TextEncoder
from cmg_core.encoders.text import DEFAULT_TEXT_MODEL
from cmg_core.errors import DataError

SMALL = {"n_per_class": 3, "classes": 3, "size": 48}
SIZE = 32


def fields(ds: CaptionedDataset) -> list[tuple]:
    return [(it.image_id, it.captions, it.class_id, it.class_name, it.split) for it in ds.items]


def layout_reference(ds: CaptionedDataset, rows, encoder: TextEncoder) -> np.ndarray:
    """The (R, C, T) layout of encoders.caption_tensor, rebuilt here from the captions."""
    caps = [list(ds[i].captions) for i in rows]
    c = max(len(x) for x in caps)
    return encoder.encode([x[j % len(x)] for x in caps for j in range(c)]).reshape(len(rows), c, -1)


@pytest.fixture(scope="module")
def source() -> CaptionedDataset:
    return load_dataset("synthetic", **SMALL)


@pytest.fixture(scope="module")
def packed_file(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "small.npz"
    info = pack_dataset(source, SIZE, out, source={"name": "synthetic", "options": SMALL})
    return out, info


@pytest.fixture(scope="module")
def packed(packed_file) -> CaptionedDataset:
    return load_dataset("packed", root=packed_file[0])


def test_metadata(packed_file, source):
    out, info = packed_file
    meta = read_packed_meta(out)
    assert meta["format"] == "cmg-packed" and meta["format_version"] == FORMAT_VERSION
    assert meta["source"]["name"] == "synthetic" and meta["source"]["options"] == SMALL
    assert meta["source"]["root"] == str(source.root.resolve())
    assert meta["image_size"] == SIZE and meta["text_model"] == DEFAULT_TEXT_MODEL and meta["embedding_dim"] == 384
    assert meta["num_images"] == len(source) and meta["num_captions"] == source.num_captions
    assert info["bytes"] == out.stat().st_size
    with np.load(out, allow_pickle=False) as z:  # plain numpy reads every entry without pickle
        assert z["images"].shape == (len(source), SIZE, SIZE, 3) and z["images"].dtype == np.uint8
        assert z["embeddings_0"].dtype == np.float32
        assert z["embeddings_0"].shape == (meta["num_unique_captions"], 384)
        assert z["caption_index"].dtype == np.int32 and z["caption_index"].shape == (len(source), 5)
        assert json.loads(str(z["meta_json"]))["image_size"] == SIZE


def test_items_equal_source(packed, source, packed_file):
    assert packed.name == source.name
    assert packed.class_names == source.class_names
    assert fields(packed) == fields(source)
    assert np.array_equal(packed.labels, source.labels)
    assert packed.summary()["splits"] == source.summary()["splits"]
    assert packed.paths[2] == pseudo_path(packed_file[0], 2) and str(packed.paths[2]).endswith("#2")
    assert len(set(packed.paths)) == len(packed)
    # numeric source meta comes back as arrays, the rest as JSON
    assert np.array_equal(packed.meta["object_boxes"], source.meta["object_boxes"])
    assert packed.meta["backgrounds"] == source.meta["backgrounds"]
    assert packed.meta["packed"]["image_size"] == SIZE and packed.packed_size == SIZE
    assert source.packed_size is None and source.images is None and source.caption_embeddings is None


def test_pixels_bit_identical(packed, source):
    rows = np.arange(len(source))
    expect = np.stack([np.asarray(load_rgb(p, size=SIZE)) for p in source.paths])
    assert np.array_equal(packed.image_array(rows, SIZE), expect)
    assert np.array_equal(source.image_array(rows, SIZE), expect)  # file-backed route, same function
    assert np.array_equal(packed.image_array([4, 1], None), expect[[4, 1]])
    img = packed.load_image(3, SIZE)
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(img), expect[3])
    assert np.array_equal(np.asarray(packed.load_image(3)), expect[3])


def test_wrong_size_names_both_sizes(packed):
    with pytest.raises(DataError, match=r"packed at 32x32 .* 64x64 was requested; repack"):
        packed.image_array([0], 64)
    with pytest.raises(DataError, match="packed at 32x32"):
        packed.load_image(0, 128)


def test_caption_embeddings_match_encoder(packed, source):
    rows = np.array([5, 0, 8, 2])
    got = packed.caption_embeddings_for(rows, DEFAULT_TEXT_MODEL)
    assert got.dtype == np.float32 and got.shape == (4, 5, 384)
    np.testing.assert_allclose(got, layout_reference(source, rows, TextEncoder()), atol=1e-6, rtol=0)
    # a fresh, uncached encoder agrees too (batching differs, so only up to float noise)
    np.testing.assert_allclose(got, layout_reference(source, rows, TextEncoder(cache=False)), atol=1e-5, rtol=0)
    assert packed.caption_embeddings_for(rows, "all-MiniLM-L6-v2") is not None  # an alias of the default
    assert packed.caption_embeddings_for(rows, "some-other-model") is None
    assert source.caption_embeddings_for(rows, DEFAULT_TEXT_MODEL) is None


def test_uneven_caption_counts_repeat_cyclically(tmp_path, source):
    """Images with fewer captions repeat theirs, exactly like encoders.caption_tensor."""
    from dataclasses import replace

    items = [replace(it, captions=it.captions[: 1 + i % 5]) for i, it in enumerate(source.items)]
    ds = CaptionedDataset(name="uneven", items=items, class_names=source.class_names, root=source.root)
    out = tmp_path / "uneven.npz"
    pack_dataset(ds, SIZE, out)
    with np.load(out) as z:
        assert (z["caption_index"] == -1).sum() == sum(5 - len(it.captions) for it in items)
    packed = load_dataset("packed", out)
    assert fields(packed) == fields(ds)
    enc = TextEncoder()
    for rows in (np.arange(len(ds)), np.array([0, 1]), np.array([5, 0])):  # C = max count among the rows
        got = packed.caption_embeddings_for(rows, DEFAULT_TEXT_MODEL)
        np.testing.assert_allclose(got, layout_reference(ds, rows, enc), atol=1e-6, rtol=0)
    assert packed.caption_embeddings_for([0], DEFAULT_TEXT_MODEL).shape == (1, 1, 384)


def test_errors_name_file_and_expectation(tmp_path, packed_file):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz does not exist"):
        load_dataset("packed", missing)
    with pytest.raises(DataError, match="is a folder"):
        load_dataset("packed", tmp_path)
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("packed")
    text = tmp_path / "notes.npz"
    text.write_text("not a zip at all")
    with pytest.raises(DataError, match=r"notes.npz is not a packed dataset file .*cmg data pack"):
        load_dataset("packed", text)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(3))
    with pytest.raises(DataError, match=r"plain.npz is not a packed dataset file \(no meta_json"):
        load_dataset("packed", plain)
    # an older/newer format version
    future = tmp_path / "future.npz"
    with np.load(packed_file[0]) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta_json"]))
    meta["format_version"] = FORMAT_VERSION + 1
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(future, **arrays)
    with pytest.raises(DataError, match=rf"future.npz has format version {FORMAT_VERSION + 1}.*repack"):
        load_dataset("packed", future)
    assert zipfile.is_zipfile(future)
    with pytest.raises(DataError, match="unknown option"):
        load_dataset("packed", packed_file[0], size=3)
    with pytest.raises(DataError, match="expected an integer image size"):
        pack_dataset(load_dataset("packed", packed_file[0]), 0, tmp_path / "x.npz")


def test_repacking_a_packed_dataset(tmp_path, packed):
    out = tmp_path / "again.npz"
    pack_dataset(packed, SIZE, out, text_models=[])
    again = load_dataset("packed", out)
    assert fields(again) == fields(packed) and np.array_equal(again.images, packed.images)
    assert again.caption_embeddings == {} and again.caption_embeddings_for([0], DEFAULT_TEXT_MODEL) is None
    with pytest.raises(DataError, match="repack"):
        pack_dataset(packed, 16, tmp_path / "smaller.npz")
    assert not (tmp_path / "smaller.npz").exists()  # nothing half-written


def test_cli_data_pack(tmp_path, capsys, source):
    out = tmp_path / "cli.npz"
    opts = [f"-o {k}={v}".split() for k, v in SMALL.items()]
    argv = ["data", "pack", "synthetic", "--size", "24", "--out", str(out), *[a for o in opts for a in o]]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "24x24" in printed and "MiB" in printed
    ds = load_dataset("packed", out)
    assert fields(ds) == fields(source) and ds.packed_size == 24
    assert read_packed_meta(out)["source"]["options"] == SMALL
    # it shows like any dataset, and errors come back as `cmg: error`
    assert cli_main(["data", "show", "packed", "--root", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(source)
    assert cli_main(["data", "pack", "synthetic", "--size", "24", "--out", str(tmp_path / "bad.npz"),
                     "-o", "bogus=1"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert cli_main(["data", "show", "packed", "--root", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ucm
def test_real_ucm_packed_32px(ucm_root, tmp_path):
    src = load_dataset("ucm_captions", ucm_root)
    out = tmp_path / "ucm32.npz"
    info = pack_dataset(src, 32, out)
    assert out.stat().st_size <= 16 * 10**6, f"{out.stat().st_size} bytes"
    assert info["num_unique_captions"] == 2031 and info["num_captions"] == 10500
    ds = load_dataset("packed", out)
    assert fields(ds) == fields(src) and ds.class_names == src.class_names
    rows = np.array([0, 777, 2099])
    assert np.array_equal(ds.image_array(rows, 32), src.image_array(rows, 32))


def test_training_from_the_packed_file_gives_the_same_numbers(tmp_path, monkeypatch):
    """The same task and the same scores from the folder and from its packed file (end2end profile: images
    from the file, caption embeddings from the file instead of the text model, frozen-E1 features from the
    same pixels)."""
    import pandas as pd

    from cmg_core.config import load_config
    from cmg_core.data.packed import pack_dataset
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    opts = {"n_per_class": 8, "classes": 4}
    src = load_dataset("synthetic", None, **opts)
    pack_dataset(src, 32, tmp_path / "syn.npz", source={"name": "synthetic", "options": opts}, device="cpu")
    common = [f"out_dir={tmp_path}", "task.normal_classes=[circle, square]", "e1.epochs=2", "cmer.rid_epochs=2",
              "cmle.n_clusters=2", "cmle.n_neighbors=3", "e2.epochs=1", "e2.batch_size=8", "model.backbone=cnn",
              "model.width=4", "train.device=cpu", "train.methods=[ssd, cmg[lle], cmg[supcon]]"]
    runs = {}
    for name, data in (("folder", ["data.name=synthetic", "data.options={n_per_class: 8, classes: 4}"]),
                       ("packed", ["data.name=packed", f"data.root={tmp_path / 'syn.npz'}", "data.options={}"])):
        cfg = load_config("configs/synthetic_end2end.yaml", [*common, *data, f"name={name}"])
        runs[name] = Run.open(train_run(cfg))
    a, b = runs["folder"], runs["packed"]
    assert a.images()[["index", "image_id", "class_id", "role"]].equals(b.images()[["index", "image_id", "class_id",
                                                                                    "role"]])
    pd.testing.assert_frame_equal(a.cmer(), b.cmer())
    pd.testing.assert_frame_equal(a.scores(), b.scores())
    assert a.metrics() == b.metrics()


def test_pseudo_paths_open_as_images(tmp_path):
    """The app shows a packed run's images through their pseudo paths (`<file>#<row>`)."""
    from cmg_core.data.images import open_image

    src = load_dataset("synthetic", None, n_per_class=2, classes=2)
    pack_dataset(src, 16, tmp_path / "p.npz", text_models=[])
    ds = load_dataset("packed", tmp_path / "p.npz")
    img = open_image(ds[3].path)
    assert img.size == (16, 16) and np.array_equal(np.asarray(img), ds.images[3])
    with pytest.raises(DataError, match="outside"):
        open_image(pseudo_path(tmp_path / "p.npz", 99))
    with pytest.raises(DataError, match="does not exist"):
        open_image(tmp_path / "nothing.npz#1")
