"""The run folder: everything one training run writes, and the reader the app and CLI use.

Layout (all paths relative to the run folder)::

    config.yaml          resolved RunConfig
    run.json             name, status (running|done|failed), times, device, profile, methods, dataset,
                         class names, normal classes, M, mask mode, image size, error
    progress.json        latest progress: stage, done, total, message, time (for live views)
    log.txt              human-readable log
    images.csv           one row per image of the task: row, index (in the dataset), image_id, path,
                         class_id, class_name, role (train|test), is_anomaly, captions (" | "-joined)
    cmer.csv             per image (same rows): e1_score_0..M-1 (Eq.2 vs own captions), cmer_label,
                         rid_prob_0..M-1, rid_choice, agree. Test-image CMER labels are analysis only.
    scores.csv           per image (same rows): score_<key> (higher = more anomalous); key = <method> for the
                         Mahalanobis score (Eq.14), <method>@knn for the k-NN score (cmg_core.methods.scored_key)
    metrics.json         {key: {auroc, aupr, fpr95, threshold, flagged_normal, flagged_anomaly}} in percent,
                         on the test rows (flagged_*: share above the detector's calibrated threshold)
    history.jsonl        one JSON object per epoch: stage (e1|rid|e2), method, epoch, losses/accuracies,
                         test auroc (recorded for plots only, never used to choose a model)
    embeddings/<m>.npy   (rows, D) features of method m the detectors score (E2's; the trunk's for `raw`),
                         aligned with images.csv
    models/              e1.npz, rid.npz, <method>.npz - final-epoch weights + each scorer's detector (NumPy
                         archives read without pickle: cmg_core.artifacts)
    checkpoints/         per-stage checkpoints for resuming an interrupted run
    language.npz         the verdicts in words (cmg_core.language): trunk features -> caption space, the normal
                         training captions, the CMLE caption clusters, the BLISS dictionary (frozen E1 trunk only)
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError
from .utils import atomic_path, is_temporary, load_npy, read_bounded_text

LOG_TAIL_BYTES = 1 << 20  # read from the end of log.txt

RUN_FILES = ("config.yaml", "run.json", "images.csv", "cmer.csv", "scores.csv", "metrics.json", "history.jsonl")


# Every top-level entry a run folder may hold (the layout above, plus what the app's Train page adds); a folder
# holding anything else is somebody's, not a run's, and is never deleted (see `remove_run_folder`).
RUN_ENTRIES = frozenset(RUN_FILES + ("progress.json", "log.txt", "language.npz", "launch.json", "stdout.log",
                                     "analysis", "embeddings", "models", "checkpoints"))


def foreign_entries(path: Path) -> list[str]:
    """Names in folder `path` that no run writes (sorted; an atomic write's `.<name>.*.tmp` file counts as a run's)."""
    def ours(p: Path) -> bool:
        return is_temporary(p) or (p.name in RUN_ENTRIES and not p.is_symlink())
    return sorted(p.name for p in Path(path).iterdir() if not ours(p))


def holds_run(path: Path) -> bool:
    """True when folder `path` holds a run this tool wrote: a run.json object with a name and a status, or the
    launch.json of a run the app started before its run.json was written."""
    for name, keys in (("run.json", ("name", "status")), ("launch.json", ("pid", "command"))):
        f = Path(path) / name
        if f.is_file() and not f.is_symlink():
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and all(k in data for k in keys):
                return True
    return False


def check_run_folder(path: Path) -> None:
    """Refuse (DataError) to train into an existing folder that is neither empty nor a run folder: its files are
    somebody's, and a run would write over them."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DataError(f"{path} exists and is not a folder; choose another run name or out_dir")
    if not path.is_dir() or holds_run(path):
        return
    other = foreign_entries(path)
    if other:
        raise DataError(f"{path} exists and is not a run folder (no run.json; it holds {_listing(other)}); "
                        "nothing was changed - choose another run name or out_dir, or an empty folder")


def remove_temporaries(run_dir: Path) -> list[str]:
    """Delete the temporary files of atomic writes that a killed process left in run folder `run_dir` (only files
    named like `atomic_path`'s, in the run's own entries); returns what was removed."""
    gone = []
    for entry in [Path(run_dir)] + [Path(run_dir) / n for n in sorted(RUN_ENTRIES)]:
        if entry.is_dir() and not entry.is_symlink():
            for p in sorted(entry.iterdir()):
                if is_temporary(p):
                    p.unlink()
                    gone.append(str(p.relative_to(run_dir)))
    return gone


def remove_run_folder(path: Path) -> None:
    """Delete run folder `path`, only if this tool wrote it: it holds a run (`holds_run`) and nothing a run does not
    write (`RUN_ENTRIES`). Otherwise a DataError names what is there, and nothing is deleted."""
    import shutil

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise DataError(f"{path} is not a run folder (a link or a file); refusing to delete it")
    if not any(path.iterdir()):
        return  # empty: nothing of anybody's to lose, and the run writes into it
    if not holds_run(path):
        raise DataError(f"{path} is not a run folder written by this tool (no run.json); refusing to delete it "
                        f"(it holds {_listing(foreign_entries(path) or sorted(p.name for p in path.iterdir()))})")
    other = foreign_entries(path)
    if other:
        raise DataError(f"run folder {path} also holds {_listing(other)}, which no run writes; refusing to delete "
                        "it - move those out first, or choose another run name")
    shutil.rmtree(path)


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def method_slug(method: str) -> str:
    """File-system name of a method: 'ssd+er' -> 'ssd_er'."""
    return method.replace("+", "_").replace("-", "_")


# --- writing -----------------------------------------------------------------------------------------

def write_json(path: Path, data: Any, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


class RunWriter:
    """Appends history/log lines and updates run.json/progress.json of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in ("embeddings", "models", "checkpoints"):
            (self.path / sub).mkdir(exist_ok=True)

    def update_info(self, **fields) -> dict:
        info = read_json(self.path / "run.json") if (self.path / "run.json").is_file() else {}
        info.update(fields)
        write_json(self.path / "run.json", info)
        return info

    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        write_json(self.path / "progress.json",
                   {"stage": stage, "done": int(done), "total": int(total), "message": message, "time": time.time()},
                   durable=False)  # rewritten every step; a live view only

    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    def history(self, **record) -> None:
        with open(self.path / "history.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")

    def clear_history(self, stage: str, method: str | None = None, after_epoch: int = 0) -> None:
        """Drop records of a stage (and method) with epoch > after_epoch: a restarted or resumed stage
        writes them again."""
        hist = self.path / "history.jsonl"
        if not hist.is_file():
            return

        def drop(rec: dict) -> bool:
            return rec.get("stage") == stage and rec.get("method") == method and rec.get("epoch", 0) > after_epoch

        keep = [line for line in hist.read_text().splitlines() if line.strip() and not drop(json.loads(line))]
        with atomic_path(hist) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))


# --- reading -----------------------------------------------------------------------------------------

def read_json(path: Path, expect: type | None = None) -> Any:
    """A JSON file of a run folder (bounded), optionally checked to hold an `expect` (dict, list) at the top."""
    try:
        data = json.loads(read_bounded_text(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if expect is not None and not isinstance(data, expect):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a JSON "
                        f"{'object' if expect is dict else expect.__name__}")
    return data


# columns every reader of a run table relies on
CSV_COLUMNS = {"images.csv": ("row", "image_id", "path", "role", "is_anomaly"), "scores.csv": ("row",),
               "cmer.csv": ("row",)}


def check_info(info: dict, path: Path) -> dict:
    """run.json's fields that readers use, checked: a received run.json cannot make a page crash."""
    methods = info.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise DataError(f"{path}: 'methods' is {methods!r:.60}; expected a list of method names")
    n = info.get("n_regions", 4)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1024:
        raise DataError(f"{path}: 'n_regions' is {n!r:.40}; expected a whole number of mask regions")
    for key in ("name", "status"):
        if not isinstance(info.get(key, ""), str):
            raise DataError(f"{path}: {key!r} is {info[key]!r:.40}; expected a string")
    if not isinstance(info.get("created", 0), (int, float)):
        raise DataError(f"{path}: 'created' is {info['created']!r:.40}; expected a time in seconds")
    return info


@dataclass
class Run:
    """A run folder, read lazily. Every table is aligned on `images.csv` rows."""

    path: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "run.json").is_file():
            raise DataError(f"{path} is not a run folder (no run.json); expected a folder written by `cmg train`")
        return cls(path, check_info(read_json(path / "run.json", dict), path / "run.json"))

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def methods(self) -> list[str]:
        return list(self.info.get("methods", []))

    @property
    def n_regions(self) -> int:
        return int(self.info.get("n_regions", 4))

    def config(self):
        from .config import load_config

        return load_config(self.path / "config.yaml")

    def _csv(self, name: str) -> pd.DataFrame:
        p = self.path / name
        if not p.is_file():
            raise DataError(f"run {self.path} has no {name} yet (status: {self.status})")
        try:
            df = pd.read_csv(io.StringIO(read_bounded_text(p)))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise DataError(f"{p} is not a readable CSV table ({type(exc).__name__}: {exc})") from exc
        missing = [c for c in CSV_COLUMNS.get(name, ()) if c not in df.columns]
        if missing:
            raise DataError(f"{p} lacks column(s) {missing}; expected a table written by `cmg train`")
        if "row" in df.columns and (not pd.api.types.is_integer_dtype(df["row"])
                                    or not df["row"].equals(pd.Series(range(len(df))))):
            raise DataError(f"{p}: column 'row' is not 0, 1, 2, ...; expected a table written by `cmg train`")
        return df

    def images(self) -> pd.DataFrame:
        return self._csv("images.csv")

    def recorded_paths(self) -> list[str | None]:
        """images.csv's file of each row where it exists inside the run's dataset root (a received folder's
        images.csv cannot point a reader elsewhere), else None."""
        from .data.registry import inside
        from .utils import cache_dir

        cfg = self.config()
        root = cfg.data.root or cache_dir()  # synthetic images live in the cache
        return [p if Path(p).is_file() and (cfg.data.allow_outside_root or inside(p, root)) else None
                for p in self.images().path.astype(str)]

    def image_paths(self) -> list[str]:
        """Image file of each row. When recorded files are gone (a run copied to another machine, e.g. the
        shipped demo) or lie outside the run's dataset root, the dataset is loaded again from the run's config -
        the synthetic set regenerates deterministically - and rows are matched by image_id."""
        from .data import load_data

        recorded = self.recorded_paths()
        if all(p is not None for p in recorded):
            return recorded
        df, cfg = self.images(), self.config()
        ds = load_data(cfg.data)
        by_id = {it.image_id: str(it.path) for it in ds.items}
        missing = [i for i in df.image_id if i not in by_id]
        if missing:
            raise DataError(f"run {self.path}: {len(missing)} images (e.g. {missing[:3]}) are not in dataset "
                            f"{cfg.data.name!r} any more")
        return [by_id[i] for i in df.image_id]

    def cmer(self) -> pd.DataFrame:
        return self._csv("cmer.csv")

    def scores(self) -> pd.DataFrame:
        return self._csv("scores.csv")

    def metrics(self) -> dict:
        p = self.path / "metrics.json"
        return read_json(p, dict) if p.is_file() else {}

    def history(self) -> pd.DataFrame:
        p = self.path / "history.jsonl"
        if not p.is_file():
            return pd.DataFrame()
        try:
            rows = [json.loads(line) for line in read_bounded_text(p).splitlines() if line.strip()]
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{p} is not valid JSON lines: {exc}") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{p}: a line is not a JSON object; expected one record per line")
        return pd.DataFrame(rows)

    def progress(self) -> dict:
        p = self.path / "progress.json"
        return read_json(p, dict) if p.is_file() else {}

    def log_tail(self, lines: int = 30) -> str:
        p = self.path / "log.txt"
        if not p.is_file():
            return ""
        with open(p, "rb") as f:  # the end of the file only, however long it grew
            f.seek(max(p.stat().st_size - LOG_TAIL_BYTES, 0))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def embeddings(self, method: str) -> np.ndarray:
        p = self.path / "embeddings" / f"{method_slug(method)}.npy"
        if not p.is_file():
            raise DataError(f"run {self.path} has no embeddings for method {method!r} (have: {self.methods})")
        return load_npy(p)

    def analysis(self, name: str) -> Any:
        """Data of an analysis figure written by `cmg experiment` (analysis/<name>.json), or None."""
        p = self.path / "analysis" / f"{name}.json"
        return read_json(p) if p.is_file() else None


def find_runs(*roots: str | Path) -> list[Run]:
    """Every run folder directly under (or equal to) each root, newest first; unreadable ones skipped."""
    found: list[Run] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        candidates = [root] if (root / "run.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
        for c in candidates:
            try:
                found.append(Run.open(c))
            except DataError:
                continue
    found.sort(key=lambda r: r.info.get("created", 0), reverse=True)
    return found
