"""Run-folder bookkeeping of a training run: caption embeddings of its rows, the resume check, and the results
written when methods finish (see cmg_core.runs for the folder's layout)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig, load_config, to_dict
from ..errors import ConfigError
from ..metrics import detection_metrics
from ..protocol import departures
from ..runs import check_run_folder, remove_run_folder, remove_temporaries, write_csv, write_json


def caption_tensor(dataset, rows: np.ndarray, text_model: str, device: str = "cpu") -> torch.Tensor:
    """(R, C, T) caption embeddings of the given dataset rows; images with fewer captions repeat theirs.
    A packed dataset's stored embeddings are used when they are of `text_model` (no text model is loaded)."""
    stored = dataset.caption_embeddings_for(rows, text_model) if hasattr(dataset, "caption_embeddings_for") else None
    if stored is not None:
        return torch.from_numpy(np.asarray(stored, dtype=np.float32))
    from ..encoders import TextEncoder

    encoder = TextEncoder(text_model, device=device)
    caps = [list(dataset[i].captions) for i in rows]
    c = max(len(x) for x in caps)
    flat = [x[j % len(x)] for x in caps for j in range(c)]
    return torch.from_numpy(encoder.encode(flat)).view(len(rows), c, -1)


def check_resume(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """A run folder holding a different config is an error (unless `overwrite`, which replaces a run folder this
    tool wrote and nothing else); a folder that is not a run folder is never written into nor deleted."""
    if overwrite:
        remove_run_folder(run_dir)
        return
    check_run_folder(run_dir)
    old = run_dir / "config.yaml"
    if old.is_file():
        previous = load_config(old)
        a = {k: v for k, v in to_dict(previous).items() if k != "out_dir"}
        b = {k: v for k, v in to_dict(cfg).items() if k != "out_dir"}
        if a != b:
            raise ConfigError(f"run folder {run_dir} already holds a run with a different config; "
                              "choose another name (--set name=...) or pass --overwrite")
    if run_dir.is_dir():
        remove_temporaries(run_dir)  # a killed run's half-written files: the resumed run writes them again


class _NullWriter:
    """RunWriter stand-in for ranks other than 0: they write nothing."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def score_method(run, spec, h: np.ndarray, detectors: dict) -> dict:
    """Score a method's features `h` (R, D) with each fitted detector ({scorer: detector}) and log the test
    metrics: {scored key (`cmg`, `cmg@knn`): {"scores": (R,), "metrics": {...}}}."""
    from ..methods import scored_key

    out = {}
    test = slice(run.n_train, None)
    for scorer, det in detectors.items():
        scores = det.score(h)
        metrics = detection_metrics(run.is_anomaly[test], scores[test], det.threshold_)
        ranking = (f"AUROC {metrics['auroc']:.2f} AUPR {metrics['aupr']:.2f} FPR95 {metrics['fpr95']:.2f}; "
                   if "auroc" in metrics else "no anomalies in the test set (one-class run); ")
        run.log(f"{scored_key(spec.label, scorer)}: {ranking}threshold flags {metrics['flagged_normal']:.1f} % of "
                f"held-out normals (target {100 * det.fpr:.0f} %)")
        words = departures(run.cfg.protocol)
        if words:  # said next to the number: these are not honest test results
            metrics["departures"] = words
        out[scored_key(spec.name, scorer)] = {"scores": scores, "metrics": metrics}
    return out


def write_results(run, results: dict) -> None:
    """scores.csv and metrics.json of the methods finished so far."""
    write_csv(run.run_dir / "scores.csv", pd.DataFrame(
        {"row": np.arange(len(run.rows)), "role": run.roles, "is_anomaly": run.is_anomaly,
         **{f"score_{m}": r["scores"] for m, r in results.items()}}))
    write_json(run.run_dir / "metrics.json", {m: r["metrics"] for m, r in results.items()})


VIEW_CACHES = ("views_er.npy", "views_plain.npy")  # frozen.HeadE2's per-run caches under checkpoints/


def finish_run(run, results: dict, t0: float, skipped: list | None = None) -> None:
    """Write scores.csv and metrics.json and mark the run done (or `partial` when a time budget stopped it
    before `skipped` methods; running `cmg train` again trains those)."""
    write_results(run, results)
    if not skipped:  # finished: the cached augmented views only served resuming E2
        for name in VIEW_CACHES:
            (run.ckpt / name).unlink(missing_ok=True)
    run.w.update_info(status="partial" if skipped else "done", skipped_methods=skipped or [],
                      finished=time.time(), wall_time_s=time.time() - t0, stage_seconds=getattr(run, "seconds", {}))
    run.progress("done", 1, 1)
    run.log(f"done in {time.time() - t0:.1f} s")


def mark_stopped(run, exc: BaseException) -> None:
    """Record why a run stopped (failed, or interrupted by the user) in run.json and the log."""
    run.w.update_info(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      error=f"{exc.__class__.__name__}: {exc}")
    run.log(f"stopped: {exc.__class__.__name__}: {exc}")


