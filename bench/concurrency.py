"""Concurrency: five app sessions upload and score different images at once while a training started from the
Train page runs; every session must show its own images' scores (equal to the Predictor's, to the 3 decimals
shown) and none another session's file.

    .venv/bin/python bench/concurrency.py                    # 5 sessions x 4 rounds, the demo run's real models
    .venv/bin/python bench/concurrency.py --sessions 3 --rounds 2 --json /tmp/concurrency.json

Starts `streamlit run app/main.py` on a free port with an empty runs folder (the demo run is the default run),
opens one browser context per session (separate Streamlit sessions) in headless chromium, starts a small
synthetic training from the Train page, then in every round adds a different image to each session's uploads at
once and waits for all of them (round r: each session shows its r + 1 images, none of another session's). The training must finish (status done) without an error.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from bench.fuzz import cpu_name  # noqa: E402
from tests import app_fixtures as fx  # noqa: E402
from tests.test_browser import settle  # noqa: E402

SHAPES = ("circle", "square", "triangle", "star", "cross")


def image_for(session: int, rnd: int, folder: Path) -> Path:
    """A different picture per (session, round): shape, colour and background differ."""
    shape = SHAPES[(session + rnd) % len(SHAPES)]
    color = ((40 * session + 90 * rnd) % 256, (200 - 30 * session) % 256, (70 * rnd + 20) % 256)
    path = folder / f"s{session}_r{rnd}_{shape}.png"
    fx.draw_shape(shape, color, size=96, seed=100 * session + rnd).save(path)
    return path


def start_training(page, base: str, name: str) -> None:
    page.goto(f"{base}/train", wait_until="domcontentloaded")
    settle(page, "Start training", timeout=90)
    page.get_by_label("Run name").fill(name)
    for label, value in (("E1 epochs", "5"), ("RID epochs", "5"), ("E2 epochs", "2")):
        page.get_by_label(label).fill(value)
    page.get_by_role("button", name="Start training").click()
    settle(page, f"Started run {name}", timeout=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    why = fx.ensure_chromium()
    if why:
        print(f"chromium unavailable: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    from cmg_core.predict import Predictor
    from cmg_core.runs import Run

    demo = Predictor.load(REPO / "assets" / "demo_run")
    rows, t0 = [], time.perf_counter()
    print(f"concurrency: {args.sessions} sessions x {args.rounds} rounds, {cpu_name()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cmg_concurrency_") as tmp:
        tmp = Path(tmp)
        runs = tmp / "runs"
        runs.mkdir()
        port = fx.free_port()
        proc = fx.start_server(runs, port, tmp / "server.log", fake_predictor=False,
                               extra_env={"CMG_CACHE_DIR": str(tmp / "cache")})
        try:
            fx.wait_ready(port, proc, timeout=120)
            base = f"http://127.0.0.1:{port}"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=fx.CHROMIUM, args=fx.CHROMIUM_ARGS, headless=True)
                trainer = browser.new_context().new_page()
                start_training(trainer, base, "trained_meanwhile")
                pages, sent = [], []
                for s in range(args.sessions):  # one browser context = one Streamlit session
                    page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
                    page.goto(f"{base}/upload", wait_until="domcontentloaded")
                    settle(page, "Upload one or more images", timeout=90)
                    pages.append(page)
                for rnd in range(args.rounds):
                    files = [image_for(s, rnd, tmp) for s in range(args.sessions)]
                    sent += files
                    started = time.perf_counter()
                    for page, f in zip(pages, files):  # all sessions at once: the server scores them together
                        page.locator('input[type="file"]').set_input_files(str(f))
                    for s, (page, f) in enumerate(zip(pages, files)):  # a session's uploads add up: rnd + 1 files
                        settle(page, f"{rnd + 1} of {rnd + 1} file(s) scored", timeout=180)
                        want = demo.explain(Image.open(f))["scores"]
                        end = time.time() + 60  # the score metrics render last; a wrong score still fails here
                        while True:
                            body = page.inner_text("body")
                            shown = {m: f"{want[m]:.3f}" in body for m in ("cmg", "ssd")}
                            if all(shown.values()) or time.time() > end:
                                break
                            time.sleep(0.5)
                        others = [g.name for g in sent if g.name in body and not g.name.startswith(f"s{s}_")]
                        ok = all(shown.values()) and not others and f.name in body and "Traceback" not in body
                        rows.append({"round": rnd, "session": s, "image": f.name, "ok": ok, "scores_shown": shown,
                                     "other_sessions_files": others,
                                     "seconds": round(time.perf_counter() - started, 2),
                                     "expected": {m: round(float(want[m]), 4) for m in ("cmg", "ssd")},
                                     "page": None if ok else body[-3000:]})
                    status = json.loads((runs / "trained_meanwhile" / "run.json").read_text()).get("status") \
                        if (runs / "trained_meanwhile" / "run.json").is_file() else "starting"
                    print(f"round {rnd}: {sum(r['ok'] for r in rows[-args.sessions:])}/{args.sessions} sessions "
                          f"correct in {rows[-1]['seconds']:.1f} s; training: {status}", flush=True)
                end = time.time() + 900
                while time.time() < end:
                    info = Run.open(runs / "trained_meanwhile").info if (runs / "trained_meanwhile" / "run.json").is_file() else {}
                    if info.get("status") in ("done", "failed"):
                        break
                    time.sleep(2)
                training = info.get("status", "unknown")
                browser.close()
        finally:
            fx.stop_server(proc)
        log = (tmp / "server.log").read_text(errors="replace")
    ok = sum(r["ok"] for r in rows)
    tracebacks = log.count("Traceback")
    print(f"total: {len(rows)} session-uploads, {ok} correct, {len(rows) - ok} wrong; training started from the "
          f"Train page: {training}; {tracebacks} tracebacks in the server log; {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "training": training, "tracebacks": tracebacks,
                                               "uploads": rows}, indent=1))
    return 0 if ok == len(rows) and training == "done" and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
