"""Benchmark of the app in a real browser (not a test): page-load-to-populated times and upload-to-score latency.

    .venv/bin/python bench/bench_app.py                 # the demo run (assets/demo_run), real Predictor
    .venv/bin/python bench/bench_app.py --fake          # a small fake run and the fake Predictor
    .venv/bin/python bench/bench_app.py --shots /tmp/s  # also save a screenshot of each page
    .venv/bin/python bench/bench_app.py --runs DIR      # the runs of a folder (e.g. a UCM run), real Predictor

Starts the app (`python -m app`, as `make app`) on a free port, drives headless chromium (/usr/bin/chromium,
installed with apt when missing) through every page, and prints one line per measurement.  "populated" = the
page's content marker is visible and the script run has finished (no running indicator, no stale elements).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import app_fixtures as fx  # noqa: E402
from tests.test_browser import READY, TITLES, settle  # noqa: E402

DEMO = REPO / "assets" / "demo_run"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake", action="store_true", help="use a fake run + fake Predictor instead of the demo run")
    ap.add_argument("--repeat", type=int, default=3, help="warm loads per page")
    ap.add_argument("--shots", default=None, help="folder for screenshots")
    ap.add_argument("--runs", default=None, help="a runs folder to serve instead of the demo run (real Predictor)")
    args = ap.parse_args()

    why = fx.ensure_chromium()
    if why:
        print(f"chromium unavailable: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="cmg-bench-"))
    use_demo = not args.fake and not args.runs and (DEMO / "run.json").is_file()
    if args.runs:
        runs = Path(args.runs)
    elif use_demo:
        runs = tmp / "no_runs"  # only the demo run is listed
        runs.mkdir()
    else:
        runs = fx.make_runs_dir(tmp / "runs")
    port = fx.free_port()
    t0 = time.time()
    real = use_demo or bool(args.runs)
    proc = fx.start_server(runs, port, tmp / "server.log", fake_predictor=not real)
    shots = Path(args.shots) if args.shots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    try:
        fx.wait_ready(port, proc, timeout=120)
        what = f"runs of {runs} (real Predictor)" if args.runs else (
            "demo run (real Predictor)" if use_demo else "fake run (fake Predictor)")
        print(f"run: {what}")
        print(f"server ready (health check)            {time.time() - t0:6.2f} s")
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=fx.CHROMIUM, args=fx.CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": 1400})

            def load(name: str) -> float:
                t = time.perf_counter()
                page.goto(f"{base}/{fx.PAGES[name]}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=TITLES[name]).first.wait_for(timeout=180_000)
                return settle(page, READY[name], timeout=180) - t

            print(f"first load of Overview (cold server)    {load('home'):6.2f} s")
            for name in fx.PAGES:
                first = load(name)
                warm = [load(name) for _ in range(args.repeat)]
                print(f"{name:9s} first {first:6.2f} s   warm median {statistics.median(warm):6.2f} s "
                      f"(n={len(warm)})")
                if shots:
                    page.screenshot(path=str(shots / f"bench_{name}.png"), full_page=True)

            png = tmp / "upload.png"
            png.write_bytes(fx.upload_samples()["good.png"])
            for i in range(3):
                load("upload")
                other = tmp / f"upload_{i}.png"  # a new file each time, so nothing is served from the cache
                img = fx.draw_shape(["circle", "star", "cross"][i], (30, 70, 225), size=96, seed=i)
                img.save(other)
                t = time.perf_counter()
                page.locator('input[type="file"]').set_input_files(str(other))
                dt = settle(page, "file(s) scored", timeout=300) - t
                label = "upload -> score (first, loads models)" if i == 0 else "upload -> score (warm)"
                print(f"{label:39s} {dt:6.2f} s")
                if shots and i == 0:
                    page.screenshot(path=str(shots / "bench_upload_result.png"), full_page=True)
            browser.close()
    finally:
        fx.stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
