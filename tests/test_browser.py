"""The app in a real browser: streamlit server + headless chromium (playwright sync API).

Visits every page on fake run folders, uploads PNGs on the Upload page, box-selects points on the Latent
space page, and saves a screenshot of each step to $CMG_SCREENSHOT_DIR when it is set.
chromium comes from apt (`/usr/bin/chromium`); it is installed here when missing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import app_fixtures as fx  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

TITLES = {"home": "Overview", "dataset": "Dataset", "masks": "Masks: CMER & RID", "latent": "Latent space",
          "dcor": "Distance correlation", "ablation": "Ablation", "reproduction": "Reproduction",
          "upload": "Upload images", "train": "Train"}
# something that only appears once the page's content (not just its title) is there
READY = {"home": "Detection metrics", "dataset": "Image grid", "masks": "RID training", "latent": "Selected images",
         "dcor": "Paper Fig. 5", "ablation": "Fig. 9", "reproduction": "No audit yet",
         "upload": "Upload one or more images", "train": "Runs started here"}


@pytest.fixture(scope="module")
def chromium() -> str:
    why = fx.ensure_chromium()
    if why:
        pytest.skip(f"chromium is not available and could not be installed: {why}")
    pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    return fx.CHROMIUM


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    runs = fx.make_runs_dir(root / "runs")
    port = fx.free_port()
    proc = fx.start_server(runs, port, root / "server.log", fake_predictor=True,
                           extra_env={"CMG_CACHE_DIR": str(root / "cache")})
    try:
        fx.wait_ready(port, proc, timeout=90)
        yield f"http://127.0.0.1:{port}", root
    finally:
        fx.stop_server(proc)
        log = (root / "server.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def shots() -> list[Path]:
    """Where screenshots go: $CMG_SCREENSHOT_DIR when set (e.g. for docs/img/app.png); none otherwise (a full-page
    shot costs 1-2 s on 2 cores, a dozen of them a third of this test)."""
    if not os.environ.get("CMG_SCREENSHOT_DIR"):
        return []
    d = Path(os.environ["CMG_SCREENSHOT_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    return [d]


def save(page, dirs: list[Path], name: str) -> None:
    """Screenshot of the whole page: Streamlit scrolls inside its main container, so the viewport is grown
    to the content's height for the shot."""
    if not dirs:
        return
    size = page.viewport_size
    height = page.evaluate("""() => {
        const m = document.querySelector('[data-testid="stMain"]') || document.scrollingElement;
        return Math.max(m.scrollHeight, document.body.scrollHeight);
    }""")
    page.set_viewport_size({"width": size["width"], "height": int(min(max(height + 40, size["height"]), 6000))})
    time.sleep(0.8)  # charts re-layout to the new size
    path = dirs[0] / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)


def settle(page, text: str, timeout: float = 60.0) -> float:
    """Wait until `text` is on the page and the script run has finished (no running indicator, no stale
    elements) for a short while; returns the time.perf_counter() at which it became quiet (what a reader sees
    as ready; the confirmation window after it is not part of it)."""
    page.get_by_text(text, exact=False).first.wait_for(timeout=timeout * 1000)
    end, quiet, since = time.time() + timeout, 0, 0.0
    while time.time() < end:
        busy = page.evaluate("""() => {
            const w = document.querySelector('[data-testid="stStatusWidget"]');
            const running = w && w.innerText && /running|stop/i.test(w.innerText);
            const stale = document.querySelector('[data-stale="true"]');
            return Boolean(running || stale);
        }""")
        now = time.perf_counter()
        quiet, since = (0, 0.0) if busy else (quiet + 1, since or now)
        if quiet >= 4:
            return since
        time.sleep(0.12)
    raise TimeoutError(f"the page did not settle within {timeout}s")


def assert_no_traceback(page, where: str) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, f"exception box on {where}"
    body = page.inner_text("body")
    assert "Traceback" not in body, f"traceback on {where}"


def error_boxes(page) -> list[str]:
    return [e.inner_text() for e in page.locator('[data-testid="stAlertContentError"]').all()]


def test_every_page_upload_and_selection(chromium, server, shots):
    from playwright.sync_api import sync_playwright

    base, root = server
    samples = fx.upload_samples()
    files = {}
    for name in ("good.png", "rgba.png", "empty.png", "notes.txt"):
        files[name] = root / name
        files[name].write_bytes(samples[name])

    start = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=fx.CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1800})
            for name, url in fx.PAGES.items():
                page.goto(f"{base}/{url}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=TITLES[name]).first.wait_for(timeout=60_000)
                settle(page, READY[name])
                assert_no_traceback(page, name)
                assert error_boxes(page) == [], (name, error_boxes(page))
                save(page, shots, f"page_{name}")

            # Upload: a good PNG, an RGBA PNG, a 0-byte file and a text file in one batch
            page.goto(f"{base}/upload", wait_until="domcontentloaded")
            settle(page, READY["upload"])
            page.locator('input[type="file"]').set_input_files([str(f) for f in files.values()])
            settle(page, "file(s) scored", timeout=120)
            assert_no_traceback(page, "upload")
            body = page.inner_text("body")
            assert "2 of 4 file(s) scored" in body
            assert "CMG score" in body and "SSD score" in body
            errors = "\n".join(error_boxes(page))
            assert "0 bytes" in errors and "could not be decoded" in errors
            assert "alpha channel" in body
            save(page, shots, "upload_results")

            # Latent space: box-select the left half of the left map; those images appear below, the
            # other points stay visible in grey
            page.goto(f"{base}/latent", wait_until="domcontentloaded")
            settle(page, READY["latent"])
            chart = page.locator('[data-testid="stPlotlyChart"]').first
            chart.hover()
            page.locator('.modebar-btn[data-val="select"]').first.click()
            plot = chart.locator(".nsewdrag").first.bounding_box()
            page.mouse.move(plot["x"] + 3, plot["y"] + 3)
            page.mouse.down()
            page.mouse.move(plot["x"] + plot["width"] / 4, plot["y"] + plot["height"] / 2, steps=5)
            page.mouse.move(plot["x"] + plot["width"] / 2, plot["y"] + plot["height"] - 3, steps=5)
            page.mouse.up()
            page.get_by_text("Selected images (", exact=False).first.wait_for()
            end = time.time() + 60
            while time.time() < end and "Selected images (0)" in page.inner_text("body"):
                time.sleep(0.3)
            settle(page, "Clear selection")
            body = page.inner_text("body")
            n_sel = int(body.split("Selected images (")[1].split(")")[0])
            assert 0 < n_sel < 30, n_sel
            assert_no_traceback(page, "latent selection")
            save(page, shots, "latent_selection")
        finally:
            browser.close()
    assert time.time() - start < 120, f"browser test took {time.time() - start:.0f}s"
