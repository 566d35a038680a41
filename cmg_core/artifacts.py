"""The final models of a run folder, stored so that opening a folder someone sent you cannot run code.

Each model is one NumPy archive `models/<name>.npz`, read with `np.load(allow_pickle=False)`:

    model/<parameter>     the network's state_dict (float32, or float16 in the shipped demo)
    detector/<key>        the MahalanobisDetector state (arrays, numbers, strings; no objects)
    detector@knn/<key>    the KNNDetector state (its L2-normalised training features among them), when scored
    meta                  a JSON string: {"format": 2, ...} (method, text_dim, uses_er, encoder, ...)

Run folders written before this format hold pickled `models/*.pt` files; they are not loaded (unpickling can
execute code). `upgrade_run_folder` converts such a folder when its owner says they trust it (`cmg upgrade`).
Per-stage checkpoints (`checkpoints/`) stay torch files, read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .utils import atomic_path, load_npz

FORMAT = 2


def model_path(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / f"{name}.npz"


def _prefix(scorer: str) -> str:
    return "detector/" if scorer == "mahalanobis" else f"detector@{scorer}/"


def save_model(path: Path, weights: dict, detectors: dict[str, dict] | None = None, **meta) -> None:
    """Write weights (a state_dict), detector states ({scorer: state_dict}) and JSON-able `meta` to `path`
    atomically."""
    arrays = {}
    for k, v in weights.items():
        t = v.detach().cpu()
        arrays[f"model/{k}"] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    for scorer, state in (detectors or {}).items():
        for k, v in state.items():
            arrays[_prefix(scorer) + k] = np.asarray(v)
    arrays["meta"] = np.asarray(json.dumps({"format": FORMAT, **meta}))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_model(path: Path) -> tuple[dict, dict[str, dict], dict]:
    """(weights {name: tensor}, detector states {scorer: state} (empty for E1/RID), meta) from a file written by
    `save_model`."""
    path = Path(path)
    if not path.is_file():
        legacy = path.with_suffix(".pt")
        if legacy.is_file():
            raise DataError(legacy_message(legacy))
        raise DataError(f"{path} is missing; the run folder is incomplete (was training interrupted?)")
    data = load_npz(path)
    if "meta" not in data:
        raise DataError(f"{path} is not a model file written by this tool (no meta entry)")
    try:
        meta = json.loads(str(data.pop("meta")))
    except ValueError as exc:
        raise DataError(f"{path}: its meta entry is not valid JSON ({exc})") from exc
    weights = {k[len("model/"):]: torch.from_numpy(np.array(v)) for k, v in data.items() if k.startswith("model/")}
    dets: dict[str, dict] = {}
    for k, v in data.items():
        if k.startswith("detector"):
            head, _, name = k.partition("/")
            scorer = head.partition("@")[2] or "mahalanobis"
            dets.setdefault(scorer, {})[name] = _scalar(v)
    return weights, dets, meta


def _scalar(v: np.ndarray):
    """0-d arrays back to Python numbers/strings/bools; arrays stay arrays."""
    return v.item() if v.ndim == 0 else v


def legacy_message(path: Path) -> str:
    run_dir = Path(path).parent.parent
    return (f"{path} was written by an older version of cmg as a pickle, which this version does not load "
            f"(unpickling a file can execute code). Retrain the run, or - only if you trust where the folder came "
            f"from - convert it once with: cmg upgrade {run_dir} --trust")


def upgrade_run_folder(run_dir: Path, fpr: float = 0.05, calibration_folds: int = 10) -> list[Path]:
    """Convert a run folder's pickled models/*.pt into the NumPy format (the caller vouches for the folder) and
    calibrate each detector's threshold by cross-fitting on the stored embeddings of the normal training images
    (`embeddings/<method>.npy`, rows of role train in images.csv). Returns the files written; each .pt file is
    removed once its .npz is written."""
    import pandas as pd

    from .detector import MahalanobisDetector

    run_dir = Path(run_dir)
    models = run_dir / "models"
    train = (pd.read_csv(run_dir / "images.csv").role == "train").values if (run_dir / "images.csv").is_file() else None
    written = []
    for pt in sorted(models.glob("*.pt")):
        state = torch.load(pt, map_location="cpu", weights_only=False)  # trusted by the caller
        if pt.stem == "rid":
            save_model(pt.with_suffix(".npz"), state.get("rid", state) if isinstance(state, dict) else state)
        elif pt.stem == "e1":
            if "model" in state:  # trained end to end
                save_model(pt.with_suffix(".npz"), state["model"], encoder="end2end")
            else:
                weights = {**{f"image.{k}": v for k, v in state["image"].items()},
                           **{f"text.{k}": v for k, v in state["text"].items()}}
                save_model(pt.with_suffix(".npz"), weights, encoder="frozen")
        else:
            det = MahalanobisDetector.from_state_dict(state["detector"])
            emb = run_dir / "embeddings" / f"{pt.stem}.npy"
            if train is not None and emb.is_file():
                det.fpr, det.calibration_folds = fpr, calibration_folds
                det.calibration_scores_, det.calibrated_ = det._cross_fit_scores(
                    np.load(emb, allow_pickle=False)[train].astype(np.float64), None)
                det.threshold_ = float(np.quantile(det.calibration_scores_, 1 - fpr, method="higher"))
            save_model(pt.with_suffix(".npz"), state["model"], {"mahalanobis": det.state_dict()}, method=state.get("method", pt.stem),
                       text_dim=int(state.get("text_dim") or 0), uses_er=bool(state.get("uses_er", False)),
                       in_dim=state.get("in_dim"))
        pt.unlink()
        written.append(pt.with_suffix(".npz"))
    return written
