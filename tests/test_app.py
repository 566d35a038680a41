"""The Streamlit app on fake run folders (tests/app_fixtures.py): every page renders, uploads, training launch."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import app_fixtures as fx  # noqa: E402

DEMO = REPO / "assets" / "demo_run"
MAIN = str(REPO / "app" / "main.py")
PAGES = ["home", "dataset", "masks", "latent", "dcor", "ablation", "reproduction", "upload", "train"]
TITLES = {"home": "Overview", "dataset": "Dataset", "masks": "Masks: CMER & RID", "latent": "Latent space",
          "dcor": "Distance correlation", "ablation": "Ablation", "reproduction": "Reproduction", "upload": "Upload images", "train": "Train"}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return fx.make_runs_dir(tmp_path_factory.mktemp("runs"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, runs_dir):
    import streamlit as st

    monkeypatch.setenv("CMG_RUNS_DIR", str(runs_dir))
    monkeypatch.setattr("app.state.DEMO_RUN", runs_dir / "no_demo_here")  # the fake runs only
    fx.install_fake_predictor(monkeypatch)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def open_page(page: str, run: str | None = None, state: dict | None = None, timeout: float = 120):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(MAIN, default_timeout=timeout).run()
    assert not at.exception, [e.value for e in at.exception]
    if run is not None:
        at.selectbox(key="run_path").set_value(_run_path(run)).run()
        assert at.selectbox(key="run_path").value == _run_path(run)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    if page != "home":
        at.switch_page(f"../pages/{page}.py").run()
    elif state:
        at.run()
    return at


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    parts += [s.value for s in at.success]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [s.value for s in at.subheader]
    parts += [h.value for h in at.title]
    return "\n".join(str(p) for p in parts)


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# --- analysis helpers (cmg_core/analysis.py) ------------------------------------------------------------

def test_embed_2d_shapes_and_errors():
    from cmg_core.analysis import embed_2d
    from cmg_core.errors import ConfigError, DataError

    X = np.random.default_rng(0).normal(size=(40, 8))
    for method, n in (("tsne", 40), ("umap", 15)):  # UMAP runs uncompiled in tests (conftest): 7 s at 40 points
        Y = embed_2d(X[:n], method=method, seed=0)
        assert Y.shape == (n, 2) and np.isfinite(Y).all()
    np.testing.assert_allclose(embed_2d(X, "tsne", seed=0), embed_2d(X, "tsne", seed=0))
    with pytest.raises(ConfigError, match="pca"):
        embed_2d(X, method="pca")
    with pytest.raises(DataError, match="2-D"):
        embed_2d(X[0], method="tsne")
    with pytest.raises(DataError, match="at least 3"):
        embed_2d(X[:2], method="tsne")


def test_dcor_matrix_values():
    from tests.reference import distance_correlation

    from cmg_core.analysis import dcor_matrix
    from cmg_core.errors import DataError

    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 5))
    arrays = {"a": a, "2a": 2 * a + 1, "noise": rng.normal(size=(30, 3))}
    m = dcor_matrix(arrays)
    assert list(m.index) == list(m.columns) == ["a", "2a", "noise"]
    np.testing.assert_allclose(np.diag(m), 1.0)
    np.testing.assert_allclose(m.to_numpy(), m.to_numpy().T)
    assert m.loc["a", "2a"] == pytest.approx(1.0)
    assert m.loc["a", "noise"] == pytest.approx(distance_correlation(a, arrays["noise"]), rel=1e-10)
    u = dcor_matrix(arrays, bias_corrected=True)
    assert u.loc["a", "noise"] == pytest.approx(distance_correlation(a, arrays["noise"], unbiased=True), rel=1e-10)
    assert u.loc["a", "2a"] == pytest.approx(1.0)
    hi = {"x": rng.uniform(size=(20, 4000)), "noise": rng.normal(size=(20, 4000))}
    assert dcor_matrix(hi).loc["x", "noise"] > 0.9  # plain dCor saturates in high dimension
    assert abs(dcor_matrix(hi, bias_corrected=True).loc["x", "noise"]) < 0.1
    with pytest.raises(DataError, match="same number of samples"):
        dcor_matrix({"a": a, "b": a[:10]})
    with pytest.raises(DataError, match="at least 4 samples"):
        dcor_matrix({"a": a[:3], "b": a[:3]}, bias_corrected=True)


# --- the fake run itself ----------------------------------------------------------------------------------

def test_fake_run_follows_the_layout(runs_dir):
    from cmg_core.runs import RUN_FILES, find_runs

    runs = find_runs(runs_dir)
    assert [r.name for r in runs] == ["fake_full", "fake_bare"]
    for run in runs:
        for f in RUN_FILES:
            assert (run.path / f).is_file(), f
        images, cmer, scores = run.images(), run.cmer(), run.scores()
        assert len(images) == len(cmer) == len(scores)
        assert set(images["role"]) == {"train", "test"}
        assert images.loc[images["role"] == "train", "is_anomaly"].eq(0).all()
        m = run.n_regions
        assert [f"e1_score_{j}" for j in range(m)] + ["cmer_label"] + [f"rid_prob_{j}" for j in range(m)] \
            + ["rid_choice", "agree"] == [c for c in cmer.columns if c != "row"]
        for meth in run.methods:
            assert run.embeddings(meth).shape[0] == len(images)
        assert set(run.history()["stage"]) == {"e1", "rid", "e2"}
        assert Image.open(images["path"][0]).size == (64, 64)


# --- every page renders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(page):
    at = open_page(page)
    assert_clean(at)
    assert TITLES[page] in [t.value for t in at.title]
    # the sidebar frame: the run picker and what the run contains
    assert at.selectbox(key="run_path").value.endswith("fake_full")
    side = "\n".join(m.value for m in at.sidebar.markdown)
    for word in ("Status", "Dataset", "Methods", "Normal classes", "circle, square, triangle", "`cmg`"):
        assert word in side


def test_overview_shows_metrics():
    at = open_page("home")
    assert len(at.dataframe) == 1
    table = at.dataframe[0].value
    assert "cmg" in table.index and "AUROC % ↑" in table.columns
    assert {m.label for m in at.metric} >= {"images", "train", "test normal", "test anomaly"}
    assert at.get("plotly_chart")


def test_dataset_grid_and_filters():
    at = open_page("dataset")
    assert len(at.get("image")) == 24  # first page of 30 images
    at.radio(key="ds_kind").set_value("anomaly").run()
    at.radio(key="ds_role").set_value("test").run()
    assert_clean(at)
    assert "12 images" in texts(at)
    at.multiselect(key="ds_classes").set_value(["star"]).run()
    assert "6 images" in texts(at) and len(at.get("image")) == 6
    at.text_input(key="ds_query").set_value("no such caption").run()
    assert "No image matches" in texts(at)


def test_masks_page_variants_scores_and_disagreements():
    at = open_page("masks")
    assert_clean(at)
    assert len(at.get("image")) >= 1 + 4 + 1  # original, M variants, RID overlay
    captions = [c for im in at.get("image") for c in im.captions]
    assert "original" in captions and any(c.startswith("mask 0 · e1 ") and " · p " in c for c in captions)
    assert "RID agrees with CMER" in texts(at) or "RID disagrees with CMER" in texts(at)
    assert len(at.get("plotly_chart")) >= 3  # E1 scores, RID probabilities, RID accuracy
    at.toggle(key="mk_dis").set_value(True).run()
    assert_clean(at)
    assert "RID disagrees with CMER" in texts(at)
    at.text_input(key="mk_query").set_value("star_001").run()
    assert_clean(at)


def test_masks_page_with_nine_regions():
    at = open_page("masks", run="fake_bare")
    assert_clean(at)
    assert len(at.get("image")) >= 1 + 9


def test_latent_precomputed_and_selection():
    at = open_page("latent", state={"latent_selected_rows": [0, 1, 20]})
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 2
    assert "precomputed" in texts(at)
    assert "Selected images (3)" in texts(at)
    assert len(at.get("image")) == 3
    at.radio(key="lat_color").set_value("score").run()
    assert_clean(at)
    at.button(key="lat_clear").click().run()
    assert "Selected images (0)" in texts(at)


def test_latent_computed_on_demand_tsne():
    at = open_page("latent", run="fake_bare")
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 2
    assert "computed here (t-SNE" in texts(at)


def test_latent_maps_of_a_bare_run_are_computed_once_then_read_from_the_disk_cache(tmp_path, monkeypatch):
    import streamlit as st

    import cmg_core.analysis as analysis

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = analysis.embed_2d
    monkeypatch.setattr(analysis, "embed_2d", lambda X, method="tsne", seed=0: calls.append(method) or real(X, method, seed))
    run = _run_path("fake_bare")
    before = sorted(p.relative_to(run) for p in Path(run).rglob("*"))
    at = open_page("latent", run="fake_bare")
    assert_clean(at)
    assert calls == ["tsne", "tsne"] and "kept in the app's cache" in texts(at)  # ssd and cmg, once each
    assert len(list((tmp_path / "cache" / "latent").glob("*.npz"))) == 2
    st.cache_data.clear()  # a new server process: only the disk cache is left
    at = open_page("latent", run="fake_bare")
    assert_clean(at)
    assert calls == ["tsne", "tsne"] and "read from the app's cache" in texts(at)
    assert len(at.get("plotly_chart")) == 2
    assert sorted(p.relative_to(run) for p in Path(run).rglob("*")) == before  # nothing written into the run


def test_latent_page_opens_on_ssd_vs_cmg():
    at = open_page("latent")  # fake_full: ssd, ssd+er, ssd+le, cmg, cmg-mse
    assert_clean(at)
    assert (at.selectbox(key="lat_left").value, at.selectbox(key="lat_right").value) == ("ssd", "cmg")


@pytest.mark.parametrize("methods, pair", [
    (["raw", "ssd", "ssd+er", "ssd+le", "cmg[lle]", "cmg[supcon]", "cmg-mse", "bliss"], ("ssd", "cmg[lle]")),
    (["cmg[supcon]", "raw", "ssd"], ("ssd", "cmg[supcon]")),
    (["ssd", "cmg"], ("ssd", "cmg")),
    (["raw", "cmg-mse", "ssd+le"], ("raw", "cmg-mse")),  # neither: the run's first two
    (["bliss", "cmg"], ("cmg", "bliss")),
    (["not-a-method[x]", "ssd"], ("ssd", "not-a-method[x]")),
    (["cmg[supcon]"], ("cmg[supcon]", "cmg[supcon]")),
])
def test_latent_default_pair(methods, pair):
    from app.latent_maps import default_pair

    assert default_pair(methods) == pair


def test_latent_selection_event_parsing():
    ns: dict = {}
    src = (REPO / "pages" / "latent.py").read_text().split("def _on_select")[0]
    exec(compile(src, "latent.py", "exec"), ns)  # the helpers only, without rendering the page
    parse = ns["selected_rows"]
    ev = {"selection": {"points": [{"customdata": [3]}, {"customdata": {"0": 5}}, {"customdata": 7},
                                   {"customdata": [3]}, {"x": 1}]}}
    assert parse(ev) == [3, 5, 7] and parse(None) == [] and parse({"selection": {"points": []}}) == []


def test_latent_selection_greys_others():
    from app.plots import latent_scatter

    coords = np.random.default_rng(0).normal(size=(6, 2))
    fig = latent_scatter(coords, np.arange(6), np.array(list("aabbcc")), "category", ["x"] * 6, [1, 4])
    assert [list(t.selectedpoints) for t in fig.data] == [[1], [], [0]]
    assert all(len(t.x) == 2 for t in fig.data)  # nothing hidden
    assert fig.data[0].unselected.marker.color is not None


def test_dcor_precomputed_and_on_demand():
    at = open_page("dcor")
    assert_clean(at)
    assert "analysis/dcor.json" in texts(at) and len(at.get("plotly_chart")) == 1
    at.toggle(key="dc_pre_bc").set_value(True).run()
    assert_clean(at)
    assert "Bias-corrected" in str(at.get("plotly_chart")[0].proto.spec)
    at = open_page("dcor", run="fake_bare")
    assert_clean(at)
    assert "no precomputed" in texts(at)
    at.slider(key="dc_n").set_value(12).run()
    at.button(key="dc_go").click().run()
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 1
    mat = at.dataframe[0].value
    assert list(mat.index) == ["raw images", "CMER-masked images", "white noise", "uniform noise"]
    assert ((mat.to_numpy() >= 0) & (mat.to_numpy() <= 1 + 1e-9)).all()
    at.toggle(key="dc_bc").set_value(True).run()
    at.button(key="dc_go").click().run()
    assert_clean(at)
    mat = at.dataframe[0].value
    assert np.isfinite(mat.to_numpy()).all() and np.allclose(np.diag(mat), 1.0)
    assert "Bias-corrected" in str(at.get("plotly_chart")[0].proto.spec)


def test_ablation_with_and_without_analysis():
    at = open_page("ablation")
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 7  # ROC, CI bar, loss, auroc, cmle vs mse, 2 x Fig. 9
    ci = at.dataframe[0].value
    assert "±" in str(ci.iloc[0]["AUROC %"]) and ci["tasks"].eq(4).all()
    specs = " ".join(str(c.proto.spec) for c in at.get("plotly_chart"))
    assert "CMG AUROC by mask type" in specs and "RID validation accuracy by mask type" in specs
    paired = [d.value for d in at.dataframe if "wilcoxon_p_holm" in d.value.columns]  # cmg_core.significance
    assert len(paired) == 1 and list(paired[0].method) == ["ssd+er", "ssd+le", "cmg", "cmg-mse"] and \
        paired[0].n.eq(4).all() and "0.0625" in texts(at)  # against ssd only: the fake has no raw@knn
    at = open_page("ablation", run="fake_bare")
    assert_clean(at)
    t = texts(at)
    assert "cmg experiment" in t  # which command produces the missing data
    assert "train both `cmg` and `cmg-mse`" in t


def test_ablation_plots_the_other_systems(tmp_path, monkeypatch):
    """cmda, she and bliss (issue 12) are methods like any other on the ablation page: picked by default in the
    ROC picker, one curve each, a row each in the run's metrics table."""
    methods = ("raw", "ssd", "cmda", "she", "bliss", "cmg")
    fx.make_fake_run(tmp_path, "baselines", methods=methods, with_analysis=False)
    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path))
    at = open_page("ablation", run="baselines")
    assert_clean(at)
    picker = at.multiselect(key="ab_methods")
    assert list(picker.options) == list(methods) and set(picker.value) == set(methods)
    roc = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [t["name"].split(" (AUROC")[0] for t in roc["data"] if t["name"] != "chance"]
    assert names == list(methods)
    table = at.dataframe[0].value
    assert {"cmda", "she", "bliss"} <= set(map(str, table.index))


# --- uploads ----------------------------------------------------------------------------------------------

def test_process_uploads_every_kind():
    from app.uploads import process_uploads, report_png_bytes, results_table

    pred = fx.FakePredictor.load(Path(_run_path("fake_full")))
    samples = fx.upload_samples()
    res = {r.name: r for r in process_uploads(samples.items(), pred)}
    for ok in ("good.png", "rgba.png", "gray.png", "gray16.png"):
        assert res[ok].ok, res[ok].error
        assert set(res[ok].result["scores"]) == set(fx.ALL_METHODS)
    assert not res["good.png"].notes
    assert "alpha" in res["rgba.png"].notes[0] and "RGB" in res["rgba.png"].notes[0]
    assert "grayscale" in res["gray.png"].notes[0]
    assert "16-bit" in res["gray16.png"].notes[0]
    assert "0 bytes" in res["empty.png"].error
    assert "truncated" in res["truncated.png"].error
    assert "could not be decoded as an image" in res["notes.txt"].error
    assert "larger than" in res["huge.png"].error
    for bad in ("empty.png", "truncated.png", "notes.txt", "huge.png"):
        assert not res[bad].ok and res[bad].result is None
    table = results_table(list(res.values()))
    assert len(table) == len(samples)
    assert table.set_index("file").loc["good.png", "status"] == "ok"
    assert {"score_cmg", "percentile_cmg", "threshold_cmg", "verdict_cmg", "rid_choice", "rid_prob_0"} <= set(table.columns)
    png = report_png_bytes(res["good.png"], 4)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_process_uploads_model_failure_does_not_stop_the_batch():
    from app.uploads import process_uploads

    class Flaky(fx.FakePredictor):
        def explain(self, image):
            if image.size == (32, 32):
                raise RuntimeError("boom")
            return super().explain(image)

    pred = Flaky.load(Path(_run_path("fake_full")))
    small = fx.png_bytes(Image.new("RGB", (32, 32), "red"))
    out = process_uploads([("a.png", small), ("b.png", fx.upload_samples()["good.png"])], pred)
    assert not out[0].ok and "could not score" in out[0].error and "boom" in out[0].error
    assert out[1].ok


def _run_path(name: str) -> str:
    import os

    return str(Path(os.environ["CMG_RUNS_DIR"]) / name)


def test_upload_page_with_real_png():
    at = open_page("upload")
    assert_clean(at)
    assert len(at.file_uploader) == 1
    at.file_uploader[0].set_value(("shape.png", fx.upload_samples()["good.png"], "image/png")).run()
    assert_clean(at)
    labels = {m.label for m in at.metric}
    assert {"CMG score", "SSD score"} <= labels
    assert "1 of 1 file(s) scored" in texts(at)
    assert len(at.get("plotly_chart")) == 3  # RID probabilities + two histograms
    assert {b.label for b in at.get("download_button")} == {"Download all results (CSV)", "Download this result (PNG)"}
    assert len(at.get("image")) >= 3  # uploaded, overlay, masked


def test_upload_page_bad_files_in_a_batch():
    at = open_page("upload")
    s = fx.upload_samples()
    batch = [(n, s[n], "application/octet-stream") for n in ("empty.png", "notes.txt", "good.png", "rgba.png",
                                                            "truncated.png", "gray16.png")]
    at.file_uploader[0].set_value(batch).run()
    assert not at.exception
    errors = "\n".join(e.value for e in at.error)
    assert "0 bytes" in errors and "could not be decoded" in errors and "truncated" in errors
    infos = "\n".join(i.value for i in at.info)
    assert "alpha" in infos and "16-bit" in infos
    assert "3 of 6 file(s) scored" in texts(at)


def test_upload_page_without_prediction_api(monkeypatch):
    monkeypatch.setitem(sys.modules, "cmg_core.predict", None)  # `from cmg_core.predict import ...` fails
    at = open_page("upload")
    at.file_uploader[0].set_value(("shape.png", fx.upload_samples()["good.png"], "image/png")).run()
    assert not at.exception
    assert "Could not load the models" in "\n".join(e.value for e in at.error)
    assert "not scored" in "\n".join(e.value for e in at.error)


# --- robustness -------------------------------------------------------------------------------------------

def test_broken_run_shows_errors_not_tracebacks(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run = fx.make_fake_run(root, "broken", with_analysis=False)
    (run / "cmer.csv").write_text("not,a\ncmer")
    (run / "metrics.json").write_text("{ not json")
    Path(pd.read_csv(run / "images.csv")["path"][0]).unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["name"] = "folder"  # its root holds no captions file: the missing image cannot be found again
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("CMG_RUNS_DIR", str(root))
    for page in PAGES:
        at = open_page(page)
        assert not at.exception, (page, [e.value for e in at.exception])
    at = open_page("home")
    assert any("not valid JSON" in e.value for e in at.error)
    at = open_page("dataset")
    assert any("does not exist" in w.value for w in at.warning)  # the deleted image, the others are shown
    assert len(at.get("image")) == 23


def test_no_runs_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path / "empty"))
    for page in PAGES:
        at = open_page(page)
        assert not at.exception, page
    assert "No run selected" in texts(open_page("home"))


def test_running_run_without_tables(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run = root / "young"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": "young", "status": "running", "methods": ["ssd", "cmg"],
                                              "created": time.time()}))
    (run / "progress.json").write_text(json.dumps({"stage": "e1", "done": 3, "total": 10, "message": "epoch 3"}))
    monkeypatch.setenv("CMG_RUNS_DIR", str(root))
    for page in PAGES:
        at = open_page(page)
        assert_clean(at)
    at = open_page("dataset")
    assert "still training" in texts(at)


# --- training ---------------------------------------------------------------------------------------------

FAKE_TRAIN = textwrap.dedent("""
    import json, sys, time, pathlib
    run = pathlib.Path(sys.argv[1])
    def w(name, obj):
        (run / name).write_text(json.dumps(obj))
    w("run.json", {"name": run.name, "status": "running", "methods": ["ssd"], "created": time.time()})
    for i in range(3):
        w("progress.json", {"stage": "e1", "done": i + 1, "total": 3, "message": f"epoch {i + 1}"})
        with open(run / "log.txt", "a") as fh:
            fh.write(f"epoch {i + 1}\\n")
        print("step", i, flush=True)
        time.sleep(float(sys.argv[2]))
    w("run.json", {"name": run.name, "status": "done", "methods": ["ssd"], "created": time.time()})
""")


def _fake_command(run_dir: Path, step: float = 0.2) -> list[str]:
    return [sys.executable, "-c", FAKE_TRAIN, str(run_dir), str(step)]


def test_training_command_and_overrides_validate():
    from app import training

    o = training.build_overrides("r1", "/tmp/x", dataset="synthetic", normal_classes=["circle", "star"],
                                 methods=["ssd", "cmg"], e1_epochs=2, rid_epochs=3, e2_epochs=4, n_regions=9, seed=1)
    cfg = training.validate(training.DEFAULT_CONFIG, o)
    assert cfg.name == "r1" and cfg.out_dir == "/tmp/x" and cfg.train.methods == ("ssd", "cmg")
    assert cfg.task.normal_classes == ["circle", "star"] and cfg.cmer.n_regions == 9 and cfg.e2.epochs == 4
    cmd = training.build_command(training.DEFAULT_CONFIG, o)
    assert cmd[1:5] == ["-m", "cmg_core.cli", "train", "--config"] and cmd.count("--set") == len(o)
    from cmg_core.errors import ConfigError

    with pytest.raises(ConfigError):
        training.validate(training.DEFAULT_CONFIG, training.build_overrides("r", "/tmp", methods=["nope"]))
    from cmg_core.methods import method_choices

    assert training.METHOD_CHOICES == tuple(method_choices())  # the Train page offers every registered method
    assert {"raw", "cmda", "she", "bliss"} <= set(training.METHOD_CHOICES)


def test_training_launch_progress_and_finish(tmp_path):
    from app import training
    from cmg_core.errors import ConfigError

    run_dir = tmp_path / "runs" / "bg"
    pid = training.start_training(run_dir, _fake_command(run_dir, 0.3))
    assert pid > 0 and (run_dir / "launch.json").is_file()
    seen = set()
    end = time.time() + 30
    while time.time() < end:
        (la,) = training.launches(tmp_path / "runs")
        seen.add(la.state)
        if la.state == "done":
            break
        time.sleep(0.1)
    assert la.state == "done" and ("running" in seen or "starting" in seen)
    assert "step 2" in la.stdout() and "epoch 3" in la.log()
    with pytest.raises(ConfigError, match="already exists"):
        training.start_training(run_dir, _fake_command(run_dir))


def test_training_stop_and_stalled(tmp_path):
    from app import training

    run_dir = tmp_path / "runs" / "slow"
    training.start_training(run_dir, _fake_command(run_dir, 30))
    end = time.time() + 20
    while time.time() < end and training.describe(run_dir).state != "running":
        time.sleep(0.1)
    la = training.describe(run_dir)
    assert la.state == "running" and la.fraction() > 0
    assert training.stop(la)
    end = time.time() + 20
    while time.time() < end and training.describe(run_dir).state == "running":
        time.sleep(0.1)
    assert training.describe(run_dir).state == "stalled"  # run.json says running, the process is gone


def test_train_page_starts_a_run_and_finds_it_after_reload(tmp_path, monkeypatch):
    from app import training

    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("CMG_RUNS_DIR", str(root))
    seen = {}

    def fake_command(config, overrides, python=sys.executable):
        seen.update(config=config, overrides=list(overrides))
        return _fake_command(root / next(o[5:] for o in overrides if o.startswith("name=")), 0.5)

    monkeypatch.setattr(training, "build_command", fake_command)
    at = open_page("train")
    assert_clean(at)
    assert "configs/ucm_captions_scratch.yaml" in at.selectbox(key="tr_config").options
    at.radio(key="tr_profile_synthetic").set_value("end2end")
    at.text_input(key="tr_name").set_value("from_page")
    at.multiselect(key="tr_methods").set_value(["ssd", "cmg[supcon]"])
    at.number_input(key="tr_e1").set_value(2)
    submit = [b for b in at.button if b.label == "Start training"]
    submit[0].click().run()
    assert_clean(at)
    assert "Started run **from_page**" in texts(at)
    assert seen["config"].name == "synthetic.yaml" and "model.profile=end2end" in seen["overrides"]
    assert 'train.methods=["ssd", "cmg[supcon]"]' in seen["overrides"]
    assert (root / "from_page" / "launch.json").is_file()
    # a fresh session (page reload) finds the running run again
    end = time.time() + 20
    while time.time() < end and not (root / "from_page" / "run.json").is_file():
        time.sleep(0.1)
    at2 = open_page("train")
    assert_clean(at2)
    assert "from_page" in texts(at2)
    assert any(p.value is not None for p in at2.get("progress")) or "running" in texts(at2)
    end = time.time() + 30
    while time.time() < end and training.describe(root / "from_page").state != "done":
        time.sleep(0.2)
    at3 = open_page("train")
    assert "Open this run" in [b.label for b in at3.button]
    assert any(o.startswith("from_page") for o in at3.selectbox(key="run_path").options)


def test_train_page_rejects_bad_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path))
    at = open_page("train")
    at.multiselect(key="tr_methods").set_value([])
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert "Pick at least one method" in "\n".join(e.value for e in at.error)
    assert not any(p.is_dir() for p in tmp_path.iterdir())


# --- the shipped demo run (real run folder, real Predictor) ------------------------------------------------

@pytest.mark.skipif(not (DEMO / "run.json").is_file(), reason="no demo run in assets/demo_run (make demo)")
def test_demo_run_every_page_and_real_predictor(tmp_path, monkeypatch):
    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path / "no_runs"))
    monkeypatch.setattr("app.state.DEMO_RUN", DEMO)
    monkeypatch.delitem(sys.modules, "cmg_core.predict", raising=False)  # the real cmg_core.predict
    for page in PAGES:
        at = open_page(page, timeout=300)
        assert_clean(at)
        assert at.selectbox(key="run_path").value == str(DEMO)
    at = open_page("upload", timeout=300)
    at.file_uploader[0].set_value([("shape.png", fx.upload_samples()["good.png"], "image/png"),
                                   ("empty.png", b"", "image/png")]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "1 of 2 file(s) scored" in texts(at)
    assert {"CMG score", "SSD score"} <= {m.label for m in at.metric}
    assert ["empty.png is empty" in e.value for e in at.error] == [True]
    assert "**In words**" in texts(at) and "Closest dictionary words" in texts(at)  # the demo's language.npz


# --- nobody in: local by default, contained launches, Stop only for the app's own processes ---------------

def test_app_listens_on_loopback_by_default():
    import tomllib

    from app.components import served_locally

    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    make = (REPO / "Makefile").read_text()
    assert "ADDRESS ?= 127.0.0.1" in make and "--server.address $(ADDRESS)" in make
    assert served_locally("127.0.0.1") and served_locally("localhost") and served_locally("::1")
    assert not served_locally("0.0.0.0") and not served_locally("") and not served_locally(None)
    assert not served_locally("192.168.1.5")


def test_app_warns_when_served_on_the_network(monkeypatch):
    import streamlit

    assert not open_page("home").sidebar.warning  # .streamlit/config.toml: loopback, no warning
    monkeypatch.setattr(streamlit, "get_option",
                        lambda key, _real=streamlit.get_option: "0.0.0.0" if key == "server.address" else _real(key))
    at = open_page("home")
    assert "served on the network" in "\n".join(w.value for w in at.sidebar.warning)


def test_train_page_refuses_data_outside_the_allowed_folders(tmp_path, monkeypatch):
    from app import training
    from cmg_core.errors import ConfigError

    monkeypatch.setenv("CMG_DATA_DIRS", str(tmp_path / "allowed"))
    (tmp_path / "allowed" / "ds").mkdir(parents=True)
    cfg = training.validate(training.DEFAULT_CONFIG, ["data.name=folder", f"data.root={tmp_path / 'allowed' / 'ds'}"])
    training.check_launch_paths(training.DEFAULT_CONFIG, cfg)
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path)
    for root in ("/etc", tmp_path / "allowed" / ".." / "other", tmp_path / "allowed" / "escape"):
        cfg = training.validate(training.DEFAULT_CONFIG, ["data.name=folder", f"data.root={root}"])
        with pytest.raises(ConfigError, match="outside the folders"):
            training.check_launch_paths(training.DEFAULT_CONFIG, cfg)
    outside = tmp_path / "my.yaml"
    outside.write_text((REPO / "configs" / "synthetic.yaml").read_text())
    with pytest.raises(ConfigError, match="config file"):
        training.check_launch_paths(outside, training.validate(outside, []))
    # the page says so and starts nothing
    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path / "runs"))
    at = open_page("train")
    at.selectbox(key="tr_dataset_synthetic").set_value("folder").run()
    at.text_input(key="tr_root_synthetic").set_value("/etc").run()
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert "outside the folders" in "\n".join(e.value for e in at.error)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_stop_signals_only_processes_the_app_started(tmp_path):
    from app import training
    from cmg_core.errors import ConfigError

    # a received run folder naming a process of somebody else's
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        forged = tmp_path / "runs" / "forged"
        forged.mkdir(parents=True)
        (forged / "run.json").write_text(json.dumps({"name": "forged", "status": "running"}))
        (forged / "launch.json").write_text(json.dumps({"pid": other.pid, "command": ["x"], "started": time.time(),
                                                        "process_start": training.process_start(other.pid)}))
        la = training.describe(forged)
        assert la.state == "running"
        with pytest.raises(ConfigError, match="not started by this app"):
            training.stop(la)
        assert other.poll() is None  # still running: nothing was signalled
    finally:
        other.kill()
        other.wait()
    # the app's own launch, but its pid now names another process (start time differs)
    run_dir = tmp_path / "runs" / "ours"
    training.start_training(run_dir, _fake_command(run_dir, 30))
    la = training.describe(run_dir)
    registry = json.loads(training.launch_registry().read_text())
    registry[str(run_dir.resolve())]["process_start"] -= 1
    training.launch_registry().write_text(json.dumps(registry))
    with pytest.raises(ConfigError, match="not started by this app"):
        training.stop(la)
    assert training.process_alive(la.pid)
    os.killpg(la.pid, signal.SIGKILL)


def test_reproduction_page_shows_the_audit_fig10_and_masks(tmp_path, monkeypatch):
    from cmg_core.audit import audit_rows
    from cmg_core.audit_report import AUDIT_METHODS

    monkeypatch.setenv("CMG_RUNS_DIR", str(tmp_path / "runs"))
    assert "No audit yet" in texts(open_page("reproduction"))
    audit = tmp_path / "runs" / "toy_audit"
    fx.make_fake_run(audit, name="task_seed0", n_per_class=10)
    rows = audit_rows(["best_epoch", "test_captions"])
    recs = [{"seed": s, "row": r.label, "kind": r.kind, "method": m, "reported": 70.0 + 5 * i + s, "epoch1": 60.0 + s}
            for s in (0, 1) for i, r in enumerate(rows) for m in AUDIT_METHODS]
    pd.DataFrame(recs).to_csv(audit / "audit.csv", index=False)
    band = {"epoch": [1, 2, 3], "mean": [60.0, 70.0, 75.0], "ci95": [2.0, 1.0, 1.0], "tasks": 2}
    (audit / "fig10.json").write_text(json.dumps({"rows": {r.label: {"ssd": band, "cmg[supcon]": band}
                                                           for r in rows if r.best or r.kind == "honest"}}))
    at = open_page("reproduction")
    assert_clean(at)
    body = texts(at)
    assert "Highest CMG[supcon] value reached: **85.50" in body and "99.71" in body
    table = at.dataframe[0].value
    assert list(table.index)[-1] == "paper (Table I/II)" and "(+5.0)" in table.loc["best_epoch", "ssd"]
    assert len(at.get("plotly_chart")) == 1 and at.selectbox(key="rep_row").options == \
        ["honest protocol", "best_epoch", "+ test_captions"]
    assert any("RID ≠ caption-guided" in m.label for m in at.metric)
    assert len(at.get("image")) == 2  # one test image under RID's mask and under the caption-guided one


def test_upload_results_of_a_run_without_rid():
    """A run whose methods need no RID (raw, ssd, she) explains an upload without masks: the table, the report and
    the overlay say so instead of failing on a missing region."""
    from PIL import Image

    from app.uploads import UploadResult, chosen_overlay, report_lines, results_table

    img = Image.new("RGB", (32, 32))
    res = {"rid_choice": None, "rid_probs": None, "masked_image": None, "variants": [], "scores": {"raw@knn": 0.9},
           "percentiles": {"raw@knn": 97.0}, "thresholds": {"raw@knn": 0.7}, "anomalous": {"raw@knn": True}}
    r = UploadResult(name="a.png", ok=True, image=img, result=res)
    row = results_table([r]).iloc[0]
    assert row["rid_choice"] == -1 and row["verdict_raw@knn"] == "anomalous" and "rid_prob_0" not in row
    assert "no masks" in report_lines(r)[0] and chosen_overlay(r) is img
