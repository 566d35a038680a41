"""`cmg predict` throughput and peak memory against the number of images.

    .venv/bin/python bench/predict_bench.py [--run assets/demo_run] [--n 250 2000] [--batch-size 64]

Writes N random RGB images of random sizes (64-1024 px a side, PNG and JPEG) into a temporary folder, runs
`cmg predict` on it in a fresh process per N and reports images/s and the peak resident memory of that process
(`resource.getrusage(RUSAGE_CHILDREN)`). Memory should not grow with N: images are decoded a batch at a time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(64, 1025, size=2)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(folder / (f"img{i:05d}.png" if i % 2 else f"img{i:05d}.jpg"))


def run_one(run: str, folder: Path, batch_size: int, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `cmg predict` process."""
    t0 = time.perf_counter()
    code = ("import resource, sys; from cmg_core.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "predict", str(folder), "--run", run, "--out", str(out),
                          "--batch-size", str(batch_size), "--quiet"], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    peak_kb = int(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("PEAK_KB")))
    return secs, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="assets/demo_run")
    ap.add_argument("--n", type=int, nargs="+", default=[250, 2000])
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print(f"run {args.run}, batch size {args.batch_size}, {os.cpu_count()} CPU(s)")
    print("| images | wall s | images/s | peak RSS MiB |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            write_images(folder, n)
            secs, peak = run_one(args.run, folder, args.batch_size, Path(tmp) / f"scores{n}.csv")
            print(f"| {n} | {secs:.1f} | {n / secs:.1f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
