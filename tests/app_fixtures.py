"""Fake but valid run folders and a tiny fake Predictor for the app tests (no training needed).

`make_fake_run(root)` writes a run folder following the layout documented in `cmg_core/runs.py`:
config.yaml, run.json, progress.json, log.txt, images.csv (with real PNG files), cmer.csv, scores.csv,
metrics.json, history.jsonl (e1 / rid / e2 stages), embeddings/<method>.npy, models/, checkpoints/ and,
optionally, analysis/{dcor,experiment,latent,fig9}.json.

`FakePredictor` has the signature of `cmg_core.predict.Predictor` (`load(run_dir)`, `explain(pil)`);
`install_fake_predictor(monkeypatch)` puts it in place of `cmg_core.predict` for in-process tests, and
`start_server(..., fake_predictor=True)` serves the app through tests/fake_server.py, which puts
`FakePredictor.load` in place of the app's predictor factory `app.state.load_predictor` (browser test, bench).
"""
from __future__ import annotations

import io
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cmg_core.config import load_config, save_config  # noqa: E402
from cmg_core.metrics import detection_metrics  # noqa: E402
from cmg_core.runs import method_slug, write_csv, write_json, write_npy  # noqa: E402

CLASSES = ["circle", "square", "triangle", "star", "cross"]
NORMAL = ["circle", "square", "triangle"]
ALL_METHODS = ("ssd", "ssd+er", "ssd+le", "cmg", "cmg-mse")
COLORS = [(220, 30, 30), (30, 170, 50), (30, 70, 225), (245, 220, 30), (140, 40, 185)]


def draw_shape(cls: str, color, size: int = 64, seed: int = 0) -> Image.Image:
    """A small RGB image of one shape on a striped background."""
    rng = np.random.default_rng(seed)
    bg = np.full((size, size, 3), 200, np.uint8)
    bg[:, :: 4] = rng.integers(80, 160, size=3)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
    r = size // 5
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls == "circle":
        d.ellipse(box, fill=color, outline=(0, 0, 0))
    elif cls == "square":
        d.rectangle(box, fill=color, outline=(0, 0, 0))
    elif cls == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color, outline=(0, 0, 0))
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r / 2.5
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        d.polygon(pts, fill=color, outline=(0, 0, 0))
    else:
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=color)
        d.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=color)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_fake_run(root: str | Path, name: str = "fake_run", n_per_class: int = 6, methods=ALL_METHODS,
                  n_regions: int = 4, status: str = "done", with_analysis: bool = True, seed: int = 0,
                  image_size: int = 64, created: float | None = None) -> Path:
    """Write a small valid run folder `root/name` and return its path."""
    rng = np.random.default_rng(seed)
    run = Path(root) / name
    img_dir = Path(root) / f"{name}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("embeddings", "models", "checkpoints"):
        (run / sub).mkdir(parents=True, exist_ok=True)

    rows = []
    for c, cls in enumerate(CLASSES):
        for k in range(n_per_class):
            idx = c * n_per_class + k
            path = img_dir / f"{cls}_{k:03d}.png"
            draw_shape(cls, COLORS[(c + k) % len(COLORS)], size=image_size, seed=seed * 1000 + idx).save(path)
            normal = cls in NORMAL
            role = "train" if normal and k < n_per_class - 2 else "test"
            caps = [f"a {['red', 'green', 'blue', 'yellow', 'purple'][(c + k) % 5]} {cls}",
                    f"one {cls} on a striped background", f"a picture of a {cls}"]
            rows.append({"index": idx, "image_id": f"{cls}_{k:03d}", "path": str(path), "class_id": c,
                         "class_name": cls, "role": role, "is_anomaly": int(not normal),
                         "captions": " | ".join(caps)})
    images = pd.DataFrame(rows)
    images.insert(0, "row", np.arange(len(images)))
    n = len(images)
    write_csv(run / "images.csv", images)

    m = n_regions
    e1 = rng.normal(0.3, 0.1, size=(n, m))
    cmer_label = e1.argmax(1)
    logits = rng.normal(size=(n, m))
    logits[np.arange(n), cmer_label] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rid_choice = probs.argmax(1)
    cmer = pd.DataFrame({"row": np.arange(n)})
    for j in range(m):
        cmer[f"e1_score_{j}"] = e1[:, j]
    cmer["cmer_label"] = cmer_label
    for j in range(m):
        cmer[f"rid_prob_{j}"] = probs[:, j]
    cmer["rid_choice"] = rid_choice
    cmer["agree"] = (cmer_label == rid_choice).astype(int)
    write_csv(run / "cmer.csv", cmer)

    is_anom = images["is_anomaly"].to_numpy()
    test = (images["role"] == "test").to_numpy()
    scores = pd.DataFrame({"row": np.arange(n)})
    metrics = {}
    for i, meth in enumerate(methods):
        s = rng.normal(size=n) + is_anom * (1.0 + 0.4 * i)
        scores[f"score_{meth}"] = s
        metrics[meth] = detection_metrics(is_anom[test], s[test])
        write_npy(run / "embeddings" / f"{method_slug(meth)}.npy",
                  (rng.normal(size=(n, 16)) + is_anom[:, None] * (1 + i) + images["class_id"].to_numpy()[:, None]
                   ).astype(np.float32))
    write_csv(run / "scores.csv", scores)
    write_json(run / "metrics.json", metrics)

    hist = []
    for ep in range(1, 4):
        hist.append({"stage": "e1", "method": None, "epoch": ep, "loss": 3.0 / ep})
    for ep in range(1, 6):
        hist.append({"stage": "rid", "method": None, "epoch": ep, "loss": 1.4 / ep, "train_acc": 0.3 + 0.1 * ep,
                     "val_acc": 0.25 + 0.08 * ep, "chance": 1.0 / m})
    for i, meth in enumerate(methods):
        for ep in range(1, 6):
            rec = {"stage": "e2", "method": meth, "epoch": ep, "loss": 5.0 / ep + i * 0.1, "simclr": 4.0 / ep,
                   "global": 0.5 / ep if meth in ("cmg", "ssd+le") else 0.0,
                   "mse": 0.3 / ep if meth == "cmg-mse" else 0.0, "auroc": 60 + 3 * ep + i}
            hist.append(rec)
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))

    cfg = load_config(REPO / "configs" / "synthetic.yaml",
                      [f"name={name}", f"out_dir={Path(root)}", f"train.methods=[{','.join(methods)}]",
                       f"cmer.n_regions={m}", f"data.image_size={image_size}",
                       f"task.normal_classes=[{','.join(NORMAL)}]", f"data.root={img_dir}"])
    save_config(cfg, run / "config.yaml")
    now = time.time() if created is None else created
    write_json(run / "run.json", {
        "name": name, "status": status, "created": now, "updated": now, "device": "cpu", "profile": "frozen",
        "methods": list(methods), "dataset": "synthetic", "class_names": CLASSES,
        "normal_classes": NORMAL, "n_regions": m, "mask_mode": "hard", "image_size": image_size, "error": None,
    })
    write_json(run / "progress.json", {"stage": "done" if status == "done" else "e2", "done": 5, "total": 5,
                                       "message": "finished", "time": now})
    (run / "log.txt").write_text("00:00:01 start\n00:00:02 e1 done\n00:00:03 finished\n")

    if with_analysis:  # the formats cmg_core/experiment.py and cmg_core/figures.py write
        names = ["raw images", "CMER-masked images", "white noise", "uniform noise"]
        mat = np.eye(4)
        mat[0, 1] = mat[1, 0] = 0.96
        mat[0, 2] = mat[2, 0] = mat[0, 3] = mat[3, 0] = 0.93
        mat[1, 2] = mat[2, 1] = mat[1, 3] = mat[3, 1] = 0.92
        mat[2, 3] = mat[3, 2] = 0.91
        corrected = np.eye(4)
        corrected[0, 1] = corrected[1, 0] = 0.71
        write_json(run / "analysis" / "dcor.json", {"names": names, "matrix": mat.tolist(),
                                                     "matrix_bias_corrected": corrected.tolist(), "n_images": n})
        per_task = []
        for t in range(4):
            for i, meth in enumerate(methods):
                per_task.append({"seed": t, "method": meth, "auroc": 70 + 4 * i + rng.normal(),
                                 "aupr": 60 + 4 * i + rng.normal(), "fpr95": 50 - 4 * i + rng.normal()})
        write_json(run / "analysis" / "experiment.json", {"per_task": per_task, "summary": []})
        latent = {"rows": list(range(n)), "class_name": images["class_name"].tolist(),
                  "is_anomaly": images["is_anomaly"].tolist(),
                  "methods": {meth: {"tsne": rng.normal(size=(n, 2)).round(4).tolist(),
                                     "umap": rng.normal(size=(n, 2)).round(4).tolist()}
                              for meth in methods if meth in ("ssd", "cmg")}}
        write_json(run / "analysis" / "latent.json", latent)
        fig9 = [{"seed": t, "mask": mask, "auroc": 75 + (3 if mask == "hard" else 0) + rng.normal(),
                 "rid_val_acc": 0.6 + (0.1 if mask == "hard" else 0) + 0.02 * rng.normal()}
                for t in range(4) for mask in ("hard", "soft")]
        write_json(run / "analysis" / "fig9.json", fig9)
    return run


def make_runs_dir(root: str | Path) -> Path:
    """A runs folder with two runs: a finished one with analysis data and an older, bare one."""
    root = Path(root)
    make_fake_run(root, "fake_full", created=time.time())
    make_fake_run(root, "fake_bare", methods=("ssd", "cmg"), n_regions=9, with_analysis=False,
                  created=time.time() - 100, seed=1)
    return root


# --- fake Predictor ----------------------------------------------------------------------------------

class FakePredictor:
    """Same interface as `cmg_core.predict.Predictor`; cheap numpy stand-in reading the run's scores."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        info = json.loads((self.run_dir / "run.json").read_text())
        self.m = int(info.get("n_regions", 4))
        self.methods = list(info.get("methods", []))
        images = pd.read_csv(self.run_dir / "images.csv")
        scores = pd.read_csv(self.run_dir / "scores.csv")
        train = (images["role"] == "train").to_numpy()
        self.train_scores = {m: scores[f"score_{m}"].to_numpy()[train] for m in self.methods}

    @classmethod
    def load(cls, run_dir) -> "FakePredictor":
        return cls(run_dir)

    def explain(self, image: Image.Image) -> dict:
        img = image.convert("RGB").resize((64, 64))
        arr = np.asarray(img, dtype=np.float64) / 255.0
        side = int(round(self.m ** 0.5))
        edges = np.linspace(0, 64, side + 1).astype(int)
        variants, brightness = [], []
        for r in range(side):
            for c in range(side):
                v = arr.copy()
                v[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0.0
                variants.append(Image.fromarray((v * 255).astype(np.uint8)))
                brightness.append(arr[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean())
        b = np.asarray(brightness)
        probs = np.exp(4 * b) / np.exp(4 * b).sum()
        choice = int(probs.argmax())
        base = float(arr.std() * 4 - 0.5)
        scores = {m: base + 0.1 * i for i, m in enumerate(self.methods)}
        pct = {m: float((self.train_scores[m] <= s).mean() * 100) for m, s in scores.items()}
        thr = {m: float(np.percentile(self.train_scores[m], 95)) for m in self.methods}
        return {"variants": variants, "rid_probs": probs, "rid_choice": choice, "masked_image": variants[choice],
                "scores": scores, "percentiles": pct, "thresholds": thr}


def install_fake_predictor(monkeypatch) -> None:
    """Replace `cmg_core.predict` with a module whose Predictor is FakePredictor (in-process tests)."""
    mod = types.ModuleType("cmg_core.predict")
    mod.Predictor = FakePredictor
    monkeypatch.setitem(sys.modules, "cmg_core.predict", mod)
    import cmg_core

    monkeypatch.setattr(cmg_core, "predict", mod, raising=False)


# --- bad uploads -------------------------------------------------------------------------------------

def upload_samples() -> dict[str, bytes]:
    """Name -> bytes of one good PNG and every kind of awkward upload the Upload page must handle."""
    good = draw_shape("circle", (220, 30, 30), size=64)
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    gray = good.convert("L")
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257)
    img16 = Image.fromarray(arr16)
    full = png_bytes(good)
    return {
        "good.png": full,
        "rgba.png": png_bytes(rgba),
        "gray.png": png_bytes(gray),
        "gray16.png": png_bytes(img16),
        "empty.png": b"",
        "truncated.png": full[: len(full) // 2],
        "notes.txt": b"this is not an image at all\n",
        "huge.png": png_bytes(Image.new("L", (9000, 9000))),
    }


# --- a real server + browser (browser test, bench) ------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = {"home": "", "dataset": "dataset", "masks": "masks", "latent": "latent", "dcor": "dcor",
         "ablation": "ablation", "reproduction": "reproduction", "upload": "upload", "train": "train"}


def ensure_chromium(timeout: int = 600) -> str | None:
    """Install chromium with apt when /usr/bin/chromium is missing; returns None or why it failed."""
    import os
    import subprocess

    if Path(CHROMIUM).exists():
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                return f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout)[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run apt-get: {exc}"
    return None if Path(CHROMIUM).exists() else "apt-get install chromium did not provide /usr/bin/chromium"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs_dir: str | Path, port: int, log_path: str | Path, fake_predictor: bool = True,
                 extra_env: dict | None = None):
    """The app (`python -m app`, what `make app` runs) on 127.0.0.1:port (own process group; with
    `fake_predictor`, through tests/fake_server.py); returns the Popen."""
    import os
    import subprocess

    env = dict(os.environ, CMG_RUNS_DIR=str(runs_dir), PYTHONPATH=str(REPO))
    env.update(extra_env or {})
    serve = ["-m", "tests.fake_server"] if fake_predictor else ["-m", "app"]  # `make app`'s command
    cmd = [sys.executable, *serve, "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(port: int, proc=None, timeout: float = 60.0) -> None:
    import urllib.request

    url = f"http://127.0.0.1:{port}/_stcore/health"
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on port {port} within {timeout}s")


def stop_server(proc) -> None:
    """Terminate the server's process group (the group this helper started), then wait for it."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
