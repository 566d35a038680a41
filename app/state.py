"""Run discovery, the selected run, and cached reading of run folders.

Every table is read through `cmg_core.runs.Run` and cached with `st.cache_data`, keyed by the run folder
and the file's modification time, so a run that is still being written shows its newest tables while a
finished run is read from disk once.  Nothing heavy (torch, sklearn) is imported here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app.uploads import SharedPredictor
from cmg_core.errors import DataError
from cmg_core.runs import Run, find_runs, method_slug

REPO = Path(__file__).resolve().parents[1]
DEMO_RUN = REPO / "assets" / "demo_run"
RUN_KEY = "run_path"  # sidebar selectbox key
CURRENT_KEY = "current_run_path"  # survives pages that do not render the sidebar widget

TABLE_FILES = {"images": "images.csv", "cmer": "cmer.csv", "scores": "scores.csv", "history": "history.jsonl",
               "metrics": "metrics.json"}


# --- discovery -----------------------------------------------------------------------------------------

def runs_root() -> Path:
    """Folder holding run folders: $CMG_RUNS_DIR, else <repo>/runs."""
    env = os.environ.get("CMG_RUNS_DIR")
    return Path(env).expanduser() if env else REPO / "runs"


def run_roots() -> list[Path]:
    """Where runs are looked for: $CMG_RUNS_DIR alone when set (plus the demo run); else runs/, every
    experiment folder under experiments/ (one run per task) and the demo run."""
    if os.environ.get("CMG_RUNS_DIR"):
        return [runs_root(), DEMO_RUN]
    experiments = REPO / "experiments"
    exp_dirs = sorted(p for p in experiments.iterdir() if p.is_dir()) if experiments.is_dir() else []
    return [runs_root(), *exp_dirs, DEMO_RUN]


def audit_folders() -> list[Path]:
    """Audit folders (`cmg audit`: audit.csv) under the runs folder, and experiments/ unless $CMG_RUNS_DIR is
    set (as `run_roots`), newest first."""
    roots = [runs_root()] if os.environ.get("CMG_RUNS_DIR") else [runs_root(), REPO / "experiments"]
    found = [p.parent for root in roots if root.is_dir() for p in root.glob("*/audit.csv")]
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)


def discover_runs() -> list[Run]:
    """Every readable run under the runs folder plus the demo run, newest first, no duplicates."""
    seen, out = set(), []
    for run in find_runs(*run_roots()):
        key = str(run.path.resolve())
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def run_label(run: Run) -> str:
    tag = " · demo" if run.path.resolve() == DEMO_RUN.resolve() else ""
    return f"{run.name} ({run.status}){tag}"


def default_run(runs: list[Run]) -> Run | None:
    """The newest finished run, else the newest run."""
    for r in runs:
        if r.status == "done":
            return r
    return runs[0] if runs else None


def set_current(path: str | Path | None) -> None:
    st.session_state[CURRENT_KEY] = str(path) if path is not None else None


def current_run() -> "RunData | None":
    """The run picked in the sidebar (None when there is no run at all)."""
    path = st.session_state.get(CURRENT_KEY) or st.session_state.get(RUN_KEY)
    if not path:
        return None
    try:
        return RunData(path)
    except DataError:
        return None


# --- cached readers ------------------------------------------------------------------------------------

def file_token(path: Path) -> int:
    """Modification time (ns) of a file, 0 when it does not exist: the cache key of its contents."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=256)
def _table(run_path: str, name: str, token: int) -> Any:
    run = Run.open(run_path)
    return getattr(run, name)()


@st.cache_data(show_spinner=False, max_entries=64)
def _embeddings(run_path: str, method: str, token: int) -> np.ndarray:
    return Run.open(run_path).embeddings(method)


@st.cache_data(show_spinner=False, max_entries=64)
def _analysis(run_path: str, name: str, token: int) -> Any:
    return Run.open(run_path).analysis(name)


@st.cache_data(show_spinner=False, max_entries=64)
def _config_dict(run_path: str, token: int) -> dict:
    from cmg_core.config import to_dict

    return to_dict(Run.open(run_path).config())


@st.cache_data(show_spinner="Locating the run's image files ...", max_entries=32)
def _resolved_paths(run_path: str, token: int) -> dict[str, str]:
    """Recorded images.csv path -> a file that exists (Run.image_paths reloads the dataset when the recorded
    files are gone, e.g. the shipped demo run on a fresh machine)."""
    run = Run.open(run_path)
    recorded = run.images()["path"].astype(str).tolist()
    try:
        return dict(zip(recorded, run.image_paths()))
    except DataError:  # the dataset cannot be reloaded: the rows whose recorded file is usable
        return {r: p for r, p in zip(recorded, run.recorded_paths()) if p is not None}


@st.cache_data(show_spinner=False, max_entries=2048)
def load_image_array(path: str, size: int | None, token: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, resized to size x size (or thumbnailed when size < 0)."""
    from PIL import Image

    from cmg_core.data.images import open_image

    img = open_image(path)
    if size is not None and size > 0 and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def score_column(columns, method: str) -> str | None:
    """The scores.csv column of a method: score_<method> or score_<slug>."""
    for c in (f"score_{method}", f"score_{method_slug(method)}"):
        if c in columns:
            return c
    return None


class RunData:
    """A run folder with cached tables (one instance per script run; cheap to create)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run = Run.open(self.path)

    # --- info -------------------------------------------------------------------------------------------
    @property
    def info(self) -> dict:
        return self.run.info

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def status(self) -> str:
        return self.run.status

    @property
    def methods(self) -> list[str]:
        return self.run.methods

    @property
    def n_regions(self) -> int:
        return self.run.n_regions

    def has(self, table: str) -> bool:
        return (self.path / TABLE_FILES.get(table, table)).is_file()

    def config(self) -> dict:
        p = self.path / "config.yaml"
        if not p.is_file():
            return {}
        return _config_dict(str(self.path), file_token(p))

    def _cfg(self, section: str, key: str, default=None):
        try:
            return self.config().get(section, {}).get(key, default)
        except Exception:  # a config of another version: fall back to run.json / defaults
            return default

    @property
    def mask_mode(self) -> str:
        return str(self.info.get("mask_mode") or self.info.get("mask") or self._cfg("cmer", "mask", "hard"))

    @property
    def mask_apply(self) -> str:
        """Where the run's masks act: pixel (the encoder sees the masked image) or feature (the region's cells
        are left out of the trunk's pooling); recorded in run.json, runs made before the option used pixel."""
        return str(self.info.get("mask_apply") or "pixel")

    @property
    def soft_value(self) -> float:
        return float(self.info.get("soft_value") or self._cfg("cmer", "soft_value", 0.1))

    @property
    def image_size(self) -> int:
        return int(self.info.get("image_size") or self._cfg("data", "image_size", 128))

    @property
    def dataset(self) -> str:
        ds = self.info.get("dataset")
        if isinstance(ds, dict):
            ds = ds.get("name")
        return str(ds or self._cfg("data", "name", "?"))

    @property
    def class_names(self) -> list[str]:
        names = self.info.get("class_names")
        if names:
            return list(names)
        if self.has("images"):
            df = self.images()
            return list(df.sort_values("class_id")["class_name"].drop_duplicates())
        return []

    @property
    def normal_classes(self) -> list[str]:
        """Normal class names (run.json may hold names or ids)."""
        raw = self.info.get("normal_classes") or []
        names = self.class_names
        out = []
        for c in raw:
            if isinstance(c, (int, np.integer)) and 0 <= int(c) < len(names):
                out.append(names[int(c)])
            else:
                out.append(str(c))
        return out

    # --- tables -----------------------------------------------------------------------------------------
    def _cached(self, name: str):
        return _table(str(self.path), name, file_token(self.path / TABLE_FILES[name]))

    def images(self) -> pd.DataFrame:
        df = self._cached("images")
        if "row" not in df.columns:
            df.insert(0, "row", np.arange(len(df)))
        if "captions" in df.columns:
            df["captions"] = df["captions"].fillna("").astype(str)
        return df

    def cmer(self) -> pd.DataFrame:
        df = self._cached("cmer")
        if "row" not in df.columns:
            df.insert(0, "row", np.arange(len(df)))
        return df

    def scores(self) -> pd.DataFrame:
        df = self._cached("scores")
        if "row" not in df.columns:
            df.insert(0, "row", np.arange(len(df)))
        return df

    def history(self) -> pd.DataFrame:
        return self._cached("history")

    def metrics(self) -> dict:
        return self._cached("metrics")

    def embeddings(self, method: str) -> np.ndarray:
        p = self.path / "embeddings" / f"{method_slug(method)}.npy"
        return _embeddings(str(self.path), method, file_token(p))

    def analysis(self, name: str) -> Any:
        p = self.path / "analysis" / f"{name}.json"
        return _analysis(str(self.path), name, file_token(p))

    def progress(self) -> dict:
        return self.run.progress()

    def log_tail(self, lines: int = 30) -> str:
        return self.run.log_tail(lines)

    # --- derived ----------------------------------------------------------------------------------------
    def image_path(self, p: str | Path) -> Path:
        """The file `Run.image_paths` gives an images.csv path: the recorded file when it exists inside the
        run's dataset root, else the row's file of the dataset reloaded from the config. A path the run does not
        record is refused (DataError)."""
        found = _resolved_paths(str(self.path), file_token(self.path / "images.csv")).get(str(p))
        if found is None:
            raise DataError(f"image {p} of run {self.name!r} does not exist (or lies outside its dataset root, "
                            "or is not in its images.csv)")
        return Path(found)

    def image_array(self, path: str | Path, size: int | None = None) -> np.ndarray:
        full = self.image_path(path)
        return load_image_array(str(full), size, file_token(full))

    def method_scores(self, method: str) -> np.ndarray:
        df = self.scores()
        col = score_column(df.columns, method)
        if col is None:
            raise DataError(f"scores.csv of run {self.name!r} has no column for method {method!r} "
                            f"(columns: {[c for c in df.columns if c.startswith('score_')]})")
        return df[col].to_numpy(dtype=np.float64)

    def scored_methods(self) -> list[str]:
        """Scored keys with a scores.csv column, in run.json's method order: `cmg`, `cmg@knn`, ... (a method's
        Mahalanobis score, then its other scorers')."""
        from cmg_core.methods import SCORERS, primary_scorer, scored_key, split_key

        if not self.has("scores"):
            return []
        cols = self.scores().columns
        keys = [c[len("score_"):] for c in cols if c.startswith("score_")]
        methods = self.methods or list(dict.fromkeys(split_key(k)[0] for k in keys))
        keys = [scored_key(m, s) for m in methods for s in dict.fromkeys((primary_scorer(m), *SCORERS))]
        return [k for k in keys if score_column(cols, k) is not None]

    def joined(self) -> pd.DataFrame:
        """images.csv with cmer.csv and scores.csv columns (those present) joined on `row`."""
        df = self.images()
        for name in ("cmer", "scores"):
            if self.has(name):
                other = getattr(self, name)()
                extra = [c for c in other.columns if c not in df.columns or c == "row"]
                df = df.merge(other[extra], on="row", how="left")
        return df

    def counts(self) -> dict:
        df = self.images()
        test = df["role"] == "test"
        return {"images": len(df), "train": int((df["role"] == "train").sum()),
                "test normal": int((test & (df["is_anomaly"] == 0)).sum()),
                "test anomaly": int((test & (df["is_anomaly"] == 1)).sum())}


PREDICTORS = 4  # run folders whose models stay loaded at once (least recently used out)


def load_predictor(run_path: str):
    """A run folder's `cmg_core.predict.Predictor` (DataError when the prediction API cannot be imported).

    The one place the app makes predictors: tests replace this function (monkeypatch in-process;
    tests/fake_server.py before a streamlit server starts)."""
    try:
        from cmg_core.predict import Predictor
    except ImportError as exc:
        raise DataError(f"the prediction API (cmg_core.predict.Predictor) is not available: {exc}") from exc
    return Predictor.load(run_path)


@st.cache_resource(show_spinner=False, max_entries=PREDICTORS)
def predictor_for(run_path: str, token: int) -> SharedPredictor:
    """The run's Predictor (`load_predictor`), loaded once per run folder version and shared by every session
    behind a lock (app.uploads.SharedPredictor)."""
    return SharedPredictor(load_predictor(run_path))


def get_predictor(run: RunData):
    return predictor_for(str(run.path), file_token(run.path / "run.json"))
