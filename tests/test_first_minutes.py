"""The first minutes with a run (issue 21): latent maps written with every run and cached for the others,
plain progress lines when the output is not a terminal, `dir(cmg_core)`, the app's predictor seam."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import app_fixtures as fx  # noqa: E402


# --- latent maps ------------------------------------------------------------------------------------------

def test_cached_latent_map_is_computed_once_per_content_and_settings(tmp_path, monkeypatch):
    import cmg_core.analysis as analysis

    calls = []
    real = analysis.embed_2d
    monkeypatch.setattr(analysis, "embed_2d", lambda X, method="tsne", seed=0: calls.append(len(X)) or real(X, method, seed))
    X = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    rows, coords, hit = analysis.cached_latent_map(X, "tsne", folder=tmp_path)
    assert not hit and calls == [60] and coords.shape == (60, 2) and list(rows) == list(range(60))
    rows2, coords2, hit = analysis.cached_latent_map(X.copy(), "tsne", folder=tmp_path)
    assert hit and calls == [60]
    np.testing.assert_array_equal(coords, coords2)
    np.testing.assert_array_equal(rows, rows2)
    analysis.cached_latent_map(X, "tsne", seed=1, folder=tmp_path)  # other settings, other content: computed
    analysis.cached_latent_map(X + 1, "tsne", folder=tmp_path)
    rows3, _, _ = analysis.cached_latent_map(X, "tsne", max_points=20, folder=tmp_path)
    assert calls == [60, 60, 60, 20] and len(rows3) == 20 and (np.diff(rows3) > 0).all()
    assert len(list(tmp_path.glob("*.npz"))) == 4
    for f in tmp_path.glob("*.npz"):  # a damaged cache file is recomputed, not an error
        f.write_bytes(b"not an npz")
    assert not analysis.cached_latent_map(X, "tsne", folder=tmp_path)[2] and len(calls) == 5
    assert analysis.cached_latent_map(X, "tsne", folder=tmp_path)[2]


def test_cached_latent_map_uses_the_cache_root(tmp_path, monkeypatch):
    from cmg_core.analysis import cached_latent_map

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "c"))
    X = np.random.default_rng(1).normal(size=(30, 4))
    assert not cached_latent_map(X)[2] and cached_latent_map(X)[2]
    assert len(list((tmp_path / "c" / "latent").glob("*.npz"))) == 1


def test_cmg_train_writes_the_runs_latent_maps(tmp_path, monkeypatch, capsys):
    """`cmg train` ends with the t-SNE maps of the run's SSD and CMG features in analysis/latent.json (the training
    itself is replaced by a finished fake run folder here)."""
    import cmg_core.train as train
    from cmg_core.cli import main
    from cmg_core.figures import has_latent_maps
    from cmg_core.runs import Run

    run_dir = fx.make_fake_run(tmp_path, "trained", methods=("raw", "ssd", "cmg"), with_analysis=False)
    monkeypatch.setattr(train, "train_run", lambda cfg, progress=None, overwrite=False: run_dir)
    cfg = str(REPO / "configs" / "synthetic.yaml")
    assert main(["train", "--config", cfg, "--no-analyses"]) == 0
    assert not (run_dir / "analysis" / "latent.json").exists()
    assert main(["train", "--config", cfg]) == 0
    lat = json.loads((run_dir / "analysis" / "latent.json").read_text())
    assert set(lat["methods"]) == {"ssd", "cmg"} and all(set(m) == {"tsne"} for m in lat["methods"].values())
    assert np.asarray(lat["methods"]["cmg"]["tsne"]).shape == (len(lat["rows"]), 2)
    assert has_latent_maps(Run.open(run_dir))
    assert "latent maps of ssd, cmg written" in capsys.readouterr().err


def test_latent_maps_are_stale_once_the_embeddings_change(tmp_path):
    import os

    from cmg_core.figures import has_latent_maps, write_latent_maps
    from cmg_core.runs import Run

    run = Run.open(fx.make_fake_run(tmp_path, "r", methods=("ssd", "cmg"), with_analysis=False))
    assert not has_latent_maps(run)
    write_latent_maps(run, algos=("tsne",))
    assert has_latent_maps(run)
    emb = run.path / "embeddings" / "cmg.npy"
    lat = (run.path / "analysis" / "latent.json").stat().st_mtime_ns
    os.utime(emb, ns=(lat + 10**9, lat + 10**9))
    assert not has_latent_maps(run)


def test_an_experiment_writes_the_maps_of_every_task_run_that_lacks_them(tmp_path):
    """`write_analyses`' last step (cmg experiment): every task and mask run gets maps, runs with current ones are
    left alone (the Fig.6 run, tasks reused from an earlier invocation)."""
    from cmg_core.figures import has_latent_maps, write_missing_latent_maps
    from cmg_core.runs import Run

    runs = [Run.open(fx.make_fake_run(tmp_path, f"task_seed{k}", methods=("raw", "ssd", "cmg"), with_analysis=False,
                                      seed=k)) for k in range(2)]
    runs.append(Run.open(fx.make_fake_run(tmp_path, "task_seed0_mask_soft", methods=("cmg",), with_analysis=False)))
    runs.append(Run.open(fx.make_fake_run(tmp_path, "with_maps", methods=("ssd", "cmg"))))  # has latent.json
    assert [r.name for r in write_missing_latent_maps(runs)] == ["task_seed0", "task_seed1", "task_seed0_mask_soft"]
    assert all(has_latent_maps(r) for r in runs)
    assert set(runs[2].analysis("latent")["methods"]) == {"cmg"}
    assert write_missing_latent_maps(runs) == []


# --- progress output ----------------------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress) -> None:
    for i in range(0, 2101, 7):
        progress("trunk features", i, 2100)
    progress("trunk features", 2100, 2100)
    for epoch in range(1, 31):
        progress("E2 epochs (cmg)", epoch, 30)
    progress("images", 0, 1)
    progress("images", 1, 1)
    for i in range(0, 101):  # the next task's pass of a stage seen before
        progress("trunk features", i, 100)


def test_progress_is_plain_lines_when_the_output_is_not_a_terminal():
    from cmg_core.cli import _progress_bars

    stream = io.StringIO()
    progress, close = _progress_bars(stream)
    _drive(progress)
    close()
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 5 + 5 + 2 + 5, lines  # start, 25 / 50 / 75 %, end of each pass of a stage
    trunk = [x for x in lines if x.startswith("trunk features: ")]
    assert [x.split()[2] for x in trunk] == ["0/2100", "525/2100", "1050/2100", "1575/2100", "2100/2100",
                                             "0/100", "25/100", "50/100", "75/100", "100/100"]
    assert trunk[0].endswith("start") and trunk[4].endswith("done") and "(100%" in trunk[4]
    epochs = [x.split()[3] for x in lines if x.startswith("E2 epochs")]
    assert epochs == ["1/30", "8/30", "15/30", "23/30", "30/30"]
    assert [x.split()[1] for x in lines if x.startswith("images")] == ["0/1", "1/1"]


def test_progress_bars_in_a_terminal_are_tqdm():
    from cmg_core.cli import _progress_bars

    stream = _Tty()
    progress, close = _progress_bars(stream)
    progress("trunk features", 10, 100)
    progress("trunk features", 50, 100)
    close()
    assert "\r" in stream.getvalue() and "trunk features" in stream.getvalue()


# --- dir(cmg_core) ----------------------------------------------------------------------------------------

def test_dir_of_the_package_lists_the_lazy_api_without_importing_it():
    code = ("import sys, cmg_core; d = dir(cmg_core); "
            "print(sorted(set(cmg_core.__all__) - set(d)), '__version__' in d, d == sorted(d), "
            "'cmg_core.api' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "True", "False", "False"], out
    import cmg_core

    assert {"CMG", "SSD", "Predictor", "load_config", "train_run"} <= set(dir(cmg_core))
    assert all(hasattr(cmg_core, name) for name in ("CMG", "load_config"))


# --- the app's predictor seam ---------------------------------------------------------------------------

def test_the_app_reads_no_predictor_class_from_the_environment():
    for path in [*(REPO / "app").glob("*.py"), *(REPO / "pages").glob("*.py")]:
        assert "CMG_APP_PREDICTOR" not in path.read_text(), path
        assert "import_module" not in path.read_text(), path


def test_the_app_loads_predictors_through_its_factory(tmp_path, monkeypatch):
    import streamlit as st

    from app import state

    run = fx.make_fake_run(tmp_path, "r")
    st.cache_resource.clear()
    monkeypatch.setattr(state, "load_predictor", fx.FakePredictor.load)
    shared = state.get_predictor(state.RunData(run))
    assert isinstance(shared.predictor, fx.FakePredictor)
    st.cache_resource.clear()
    monkeypatch.undo()  # the real factory
    from cmg_core.errors import DataError

    monkeypatch.setitem(sys.modules, "cmg_core.predict", None)  # the prediction API cannot be imported
    with pytest.raises(DataError, match="prediction API"):
        state.load_predictor(str(run))
    st.cache_resource.clear()


@pytest.mark.timeout(180)
def test_the_fake_server_serves_the_app(tmp_path):
    """tests/fake_server.py: the browser test's and the bench's server, with FakePredictor swapped in."""
    runs = fx.make_runs_dir(tmp_path / "runs")
    port = fx.free_port()
    proc = fx.start_server(runs, port, tmp_path / "server.log", fake_predictor=True,
                           extra_env={"CMG_CACHE_DIR": str(tmp_path / "cache")})
    try:
        fx.wait_ready(port, proc, timeout=90)
    finally:
        fx.stop_server(proc)
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log and "Error" not in log, log[-2000:]
