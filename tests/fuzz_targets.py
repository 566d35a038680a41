"""Property-based fuzzing (Hypothesis) of everything the tool reads from users: image files (uploads and dataset
files), captions CSV / JSONL, the Karpathy JSON of UCM-captions, imagefolder metadata, YAML configs and `--set`
values, and run folders received from others.

Each target draws one input, writes it into a fresh folder and calls the tool's own entry point. The property:
the call either succeeds, with a sane result (a dataset's images all inside its root, a config that round-trips,
an 8-bit RGB image, tables that are tables), or raises a project error (`cmg_core.errors.CMGError`) with a
message. Anything else - another exception (a traceback for the user), a hang - fails the case.

Used by tests/test_fuzz.py (a short, seed-fixed run in CI) and bench/fuzz.py (the long run of the report).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from hypothesis import HealthCheck, given, seed as fixed_seed, settings
from hypothesis import strategies as st
from PIL import Image

from cmg_core.config import load_config, save_config, to_dict
from cmg_core.data import load_dataset
from cmg_core.data.registry import inside
from cmg_core.errors import CMGError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo_run"
CONFIG = REPO / "configs" / "synthetic.yaml"
HANG_S = 30.0  # a case slower than this counts as a hang

# --- building blocks ------------------------------------------------------------------------------------

NASTY_NAMES = ["../x.png", "/etc/hosts", "/etc/hostname.png", "cat/../../x.png", "x" * 300 + ".png", "a\x00b.png",
               "~/a.png", "C:\\a.png", "../link.png", "link.png", "Images/cat/a.png", "cat/a.png", "cat/b.jpg", "", " ", ".",
               "cat/", "cat/missing.png", "dog/c.png", "\u00e9t\u00e9/\u65e5.png", "cat/a.png\n", "..", "Images"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(NASTY_NAMES))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=12)
NAMES = st.one_of(st.sampled_from(NASTY_NAMES), st.text(max_size=40))
SPLIT_VALUES = st.one_of(st.sampled_from(["train", "val", "test", "validation", "", "TRAIN"]), st.text(max_size=8))


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few random edits: truncation, byte flips, inserted or deleted runs, a header overwritten."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        n = len(out)
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "truncate":
            del out[at:]
        elif op == "flip" and n:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[at:at + len(chunk)] = chunk
    return bytes(out)


def encoded_image(fmt: str, mode: str, w: int, h: int, seed: int) -> bytes:
    """A small valid image file of `fmt` in PIL `mode` (random pixels)."""
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode != "I;16" else Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    if fmt in ("JPEG",) and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    if fmt in ("BMP", "WEBP") and img.mode not in ("RGB", "RGBA", "L", "P", "1"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_files(draw) -> bytes:
    """Random bytes, a valid small image of any allowed (or a refused) format, or one mutated."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "ICO"]))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK", "I;16", "LA"]))
    try:
        data = encoded_image(fmt, mode, draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(0, 99)))
    except (OSError, ValueError, KeyError):  # this format cannot store this mode: a plain RGB one instead
        data = encoded_image(fmt, "RGB", 8, 8, 0)
    return draw(mutated(data)) if draw(st.booleans()) else data


def png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def folder_images(root: Path) -> None:
    """root/Images/{cat,dog}/* and a link leading outside the root."""
    for i, rel in enumerate(IMAGES):
        png(root / "Images" / rel, i)
    (root / "link.png").symlink_to("/etc/hostname")


def check_dataset(ds, root: Path) -> None:
    assert len(ds.items) > 0, "an accepted dataset has images"
    bad = [p for p in ds.paths if not inside(p, root)]
    assert not bad, f"accepted images outside the root: {bad[:3]}"


# --- targets --------------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    what: str
    strategy: st.SearchStrategy
    check: Callable[[object, Path], None]  # raises CMGError (refused) or returns (accepted)
    stats: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)  # the first words of each refusal
    slowest: float = 0.0


def check_image(data: bytes, work: Path) -> None:
    from app.uploads import decode_upload
    from cmg_core.data.images import open_image

    img, _, error = decode_upload("upload.bin", data)  # the Upload page's path: an error string, never a raise
    assert (img is None) == (error is not None) and (error is None or error.strip())
    path = work / "image.png"
    path.write_bytes(data)
    got = open_image(path)  # a dataset file
    assert got.mode == "RGB" and got.width > 0 and got.height > 0
    assert img is not None, "the upload path refused an image the dataset path accepts"


IMAGES = ["cat/a.png", "cat/b.jpg", "dog/c.png", "dog/d.png"]


@st.composite
def edited_rows(draw, rows: list[dict], fields: dict) -> list[dict]:
    """Valid `rows` with a few edits: a field given a random or nasty value, a row dropped or added."""
    rows = [dict(r) for r in rows]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["field", "drop", "add"]))
        if op == "field" and rows:
            row = rows[draw(st.integers(0, len(rows) - 1))]
            key = draw(st.sampled_from(sorted(fields)))
            row[key] = draw(fields[key])
        elif op == "drop" and rows:
            rows.pop(draw(st.integers(0, len(rows) - 1)))
        else:
            rows.append({k: draw(v) for k, v in fields.items()})
    return rows


CAPTION_FIELDS = {"image": st.one_of(st.sampled_from(IMAGES), NAMES),
                  "caption": st.one_of(st.just("a small red circle"), st.text(max_size=60)),
                  "class": st.one_of(st.sampled_from(["cat", "dog"]), st.text(max_size=8)), "split": SPLIT_VALUES}


@st.composite
def caption_rows(draw) -> list[dict]:
    """One row per image (several captions for some), in one of the accepted column sets or a wrong one."""
    cols = draw(st.sampled_from([["image", "caption"], ["image", "caption", "class"], ["image", "caption", "split"],
                                 ["image", "caption", "class", "split"], ["caption"], ["file", "text"]]))
    rows = [{"image": im, "caption": f"a picture {j}", "class": im.split("/")[0], "split": "train"}
            for im in IMAGES for j in range(draw(st.integers(1, 2)))]
    rows = draw(edited_rows(rows, CAPTION_FIELDS))
    return [{c: r.get(c, "") for c in cols} for r in rows]


@st.composite
def captions_csv(draw) -> bytes:
    rows = draw(caption_rows())
    cols = list(rows[0]) if rows else ["image", "caption"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    return draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data


@st.composite
def captions_jsonl(draw) -> bytes:
    lines = [json.dumps(row) if draw(st.integers(0, 9)) else json.dumps(draw(JSON)) for row in draw(caption_rows())]
    data = "\n".join(lines).encode("utf-8")
    return draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data


def check_folder(data: tuple[str, bytes], work: Path) -> None:
    name, body = data
    folder_images(work)
    (work / name).write_bytes(body)
    check_dataset(load_dataset("folder", work), work)


SENTENCES = st.one_of(st.lists(st.builds(lambda t: {"raw": t}, st.text(max_size=40)), max_size=3),
                      st.lists(JSON, max_size=2), JSON)
KARPATHY_FIELDS = {"imgid": st.one_of(st.integers(-3, 250), st.sampled_from(["0", True, 1.5, None])),
                   "sentences": SENTENCES, "split": SPLIT_VALUES, "filename": st.text(max_size=10)}


@st.composite
def karpathy_json(draw) -> bytes:
    entries = [{"imgid": i, "sentences": [{"raw": f"farm land {i}"}], "split": "train", "filename": f"{i + 1}.tif"}
               for i in range(3)]
    entries = draw(edited_rows(entries, KARPATHY_FIELDS))
    doc = draw(st.one_of(st.just({"images": entries}), st.just({"images": entries, "dataset": "ucm"}), JSON)) \
        if draw(st.integers(0, 4)) == 0 else {"images": entries}
    data = json.dumps(doc).encode("utf-8")
    return draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data


def check_karpathy(body: bytes, work: Path) -> None:
    for i in range(3):
        png(work / "Images" / "agricultural" / f"agricultural{i:02d}.png", i)
    (work / "dataset_ucm_captions.json").write_bytes(body)
    check_dataset(load_dataset("ucm_captions", work), work)


FOLDER_FILES = ["train/dog/a.png", "test/cat/b.png", "train/cat/c.png"]
META_FIELDS = {"file_name": st.one_of(st.sampled_from(FOLDER_FILES), NAMES),
               "caption": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=20), max_size=3), JSON),
               "label": st.one_of(st.text(max_size=8), JSON), "split": st.one_of(SPLIT_VALUES, JSON)}


@st.composite
def imagefolder_metadata(draw) -> tuple[str, bytes]:
    column = draw(st.sampled_from(["caption", "text", "captions", "other"]))
    rows = [{"file_name": f, "caption": [f"a photo {i}", "another"] if i else f"a photo {i}"}
            for i, f in enumerate(FOLDER_FILES)]
    rows = [{(column if k == "caption" else k): v for k, v in r.items()} for r in draw(edited_rows(rows, META_FIELDS))]
    if draw(st.booleans()):
        data = "\n".join(json.dumps(r) for r in rows).encode("utf-8")
        return "metadata.jsonl", draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data
    cols = sorted({k for r in rows for k in r}) or ["file_name", "caption"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in r.items()} for r in rows)
    data = buf.getvalue().encode("utf-8")
    return "metadata.csv", draw(mutated(data)) if draw(st.integers(0, 3)) == 0 else data


def check_imagefolder(data: tuple[str, bytes], work: Path) -> None:
    name, body = data
    for i, rel in enumerate(FOLDER_FILES):
        png(work / rel, i)
    (work / name).write_bytes(body)
    check_dataset(load_dataset("folder", work), work)


BASE_CONFIG = yaml.safe_load(CONFIG.read_text())
KEYS = sorted(f"{s}.{k}" for s, sec in BASE_CONFIG.items() if isinstance(sec, dict) for k in sec) + \
    sorted(k for k, v in BASE_CONFIG.items() if not isinstance(v, dict))
VALUE_TEXT = st.one_of(st.integers(-5, 600).map(str), st.floats(-1, 2).map(str), st.sampled_from(["abc", "null", "[3]", "{a: 1}", "true", "-1", "0", "1e999", "nan", "..",
                                        "[circle, square]", "'", "{", "10000000000000000000000", "auto", "cpu"]),
                       st.text(max_size=20))

KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=12))


@st.composite
def configs(draw) -> tuple[bytes, list[str]]:
    """A YAML config derived from configs/synthetic.yaml by random edits (or mutated text), and --set values."""
    doc = json.loads(json.dumps(BASE_CONFIG))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(KEY)
        section, _, leaf = key.partition(".")
        target = doc.setdefault(section, {}) if leaf and isinstance(doc.get(section, {}), dict) else doc
        target[leaf or section] = draw(st.one_of(JSON, st.integers(-5, 600), st.floats(-1, 2), st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        doc.pop(draw(st.sampled_from(sorted(doc))), None)
    text = yaml.safe_dump(doc).encode("utf-8")
    if draw(st.integers(0, 3)) == 0:
        text = draw(mutated(text))
    overrides = [f"{draw(KEY)}={draw(VALUE_TEXT)}"
                 for _ in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 9)) == 0:
        overrides.append(draw(st.text(max_size=20)))  # not key=value at all
    return text, overrides


def check_config(data: tuple[bytes, list[str]], work: Path) -> None:
    text, overrides = data
    path = work / "config.yaml"
    path.write_bytes(text)
    cfg = load_config(path, overrides)
    save_config(cfg, work / "again.yaml")
    assert to_dict(load_config(work / "again.yaml")) == to_dict(cfg), "an accepted config does not round-trip"


RUN_FILES = sorted(str(p.relative_to(DEMO)) for p in DEMO.rglob("*") if p.is_file())


@st.composite
def run_folders(draw) -> tuple[str, str, bytes]:
    """(file of the demo run, how it is damaged, new bytes): a run folder received from someone else."""
    rel = draw(st.sampled_from(RUN_FILES))
    how = draw(st.sampled_from(["mutate", "truncate", "replace_json", "delete", "npz"]))
    old = (DEMO / rel).read_bytes() if how in ("mutate", "truncate") else b""
    if how == "mutate":
        return rel, how, draw(mutated(old[:200_000]))
    if how == "truncate":
        return rel, how, old[:draw(st.integers(0, len(old)))]
    if how == "replace_json":
        return rel, how, json.dumps(draw(JSON)).encode()
    if how == "npz":
        buf = io.BytesIO()
        arrays = {draw(st.sampled_from(["weights", "state", "x", "meta", "scores"])): np.asarray(
            draw(st.sampled_from([[1, 2], [[1.0]], "text", [[1, 2], [3, 4]]])))}
        np.savez(buf, **arrays)
        return rel, how, buf.getvalue()
    return rel, how, b""


def check_run_folder(data: tuple[str, str, bytes], work: Path) -> None:
    from cmg_core.runs import Run

    rel, how, body = data
    run_dir = work / "run"
    for p in DEMO.rglob("*"):  # hard links: cheap copies of the files left as they are
        if p.is_file():
            (run_dir / p.relative_to(DEMO)).parent.mkdir(parents=True, exist_ok=True)
            os.link(BASE_RUN / p.relative_to(DEMO), run_dir / p.relative_to(DEMO))
    (run_dir / rel).unlink()
    if how != "delete":
        (run_dir / rel).write_bytes(body)
    run = Run.open(run_dir)
    for table in ("images", "scores", "cmer", "history"):
        assert hasattr(getattr(run, table)(), "columns")
    run.metrics(), run.progress(), run.log_tail(5), run.config(), run.image_paths()
    for m in run.methods:
        run.embeddings(m)
    for name in ("latent", "dcor"):
        run.analysis(name)
    if rel.startswith("models") or rel in ("run.json", "config.yaml", "language.npz"):
        from cmg_core.predict import Predictor

        Predictor.load(run_dir)


BASE_RUN: Path = DEMO  # replaced by a copy on the fuzz folder's file system (hard links need one)

TARGETS = {
    "image": Target("image", "image files: uploads and dataset files", image_files(), check_image),
    "captions_csv": Target("captions_csv", "captions.csv of a folder dataset",
                           captions_csv().map(lambda b: ("captions.csv", b)), check_folder),
    "captions_jsonl": Target("captions_jsonl", "captions.jsonl of a folder dataset",
                             captions_jsonl().map(lambda b: ("captions.jsonl", b)), check_folder),
    "karpathy_json": Target("karpathy_json", "UCM-captions Karpathy JSON", karpathy_json(), check_karpathy),
    "imagefolder": Target("imagefolder", "imagefolder metadata.jsonl / metadata.csv", imagefolder_metadata(),
                          check_imagefolder),
    "config": Target("config", "YAML configs and --set values", configs(), check_config),
    "run_folder": Target("run_folder", "run folders from others (the demo run, one file damaged)", run_folders(),
                         check_run_folder),
}


def run_target(target: Target, cases: int, seed: int | None, base: Path) -> None:
    """Run `cases` generated inputs through `target` (seed-fixed when `seed` is given). A failing case raises
    (Hypothesis shrinks it first); target.stats counts accepted / refused cases, target.slowest the slowest."""
    global BASE_RUN
    if target.name == "run_folder" and BASE_RUN == DEMO:
        BASE_RUN = base / "demo_run"
        shutil.copytree(DEMO, BASE_RUN, dirs_exist_ok=True)

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(target.strategy)
    def case(value):
        work = Path(tempfile.mkdtemp(dir=base))
        t = time.perf_counter()
        try:
            target.check(value, work)
            target.stats["accepted"] += 1
        except CMGError as exc:
            assert str(exc).strip(), f"{type(exc).__name__} without a message"
            target.stats["refused"] += 1
            target.reasons[" ".join(str(exc).replace(str(work), "<case>").split()[:8])] += 1
        finally:
            took = time.perf_counter() - t
            target.slowest = max(target.slowest, took)
            shutil.rmtree(work, ignore_errors=True)
        assert took < HANG_S, f"one case took {took:.1f} s"

    (fixed_seed(seed)(case) if seed is not None else case)()
