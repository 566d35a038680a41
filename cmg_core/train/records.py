"""Run-folder bookkeeping of a training run: what its stages write and read back (`RunIO`: log, progress,
history, checkpoints, final models), the resume check, and the results written when methods finish (see
cmg_core.runs for the folder's layout)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .. import distributed as D
from ..artifacts import save_model
from ..config import RunConfig, load_config, to_dict
from ..errors import ConfigError
from ..metrics import detection_metrics
from ..protocol import departures
from ..runs import check_run_folder, remove_run_folder, remove_temporaries, write_csv, write_json
from ..utils import atomic_path
from .untrained import run_text_encoder, run_text_space_map


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


class RunIO:
    """What the stages of one run write into its folder and read back: log, progress, history, per-epoch
    checkpoints (checkpoints/), final models (models/). Rank 0 writes; on other ranks every write is a no-op and
    `exists` is rank 0's answer, so every rank takes the same decision."""

    def __init__(self, run_dir: Path, main: bool, writer=None, progress: Callable[[str, int, int], None] | None = None,
                 checkpoint_every: int = 1):
        self.run_dir, self.main = run_dir, main
        self.ckpt, self.models = run_dir / "checkpoints", run_dir / "models"
        self.w = writer if writer is not None else _NullWriter()
        self._progress_cb, self._every = progress, max(int(checkpoint_every), 1)

    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.main:
            self.w.progress(stage, done, total, message)
            if self._progress_cb:
                self._progress_cb(stage, done, total)

    def log(self, msg: str) -> None:
        self.w.log(msg)

    def exists(self, path: Path) -> bool:
        """Rank 0's view of whether a file exists (every rank takes the same decision)."""
        return bool(D.broadcast_object(path.is_file() if self.main else None))

    def save(self, obj, path: Path) -> None:
        """torch.save to `path` atomically (a temporary file, then renamed); rank 0 only."""
        if self.main:
            with atomic_path(path) as tmp:
                torch.save(obj, tmp)

    def save_model(self, path: Path, weights: dict, detectors: dict | None = None, **meta) -> None:
        """A final model into models/ (NumPy archive, loadable without pickle; cmg_core.artifacts)."""
        if self.main:
            save_model(path, weights, detectors, **meta)

    def clear_history(self, stage: str, method: str | None, after_epoch: int) -> None:
        """Drop history records after `after_epoch`: a resumed stage writes them again."""
        self.w.clear_history(stage, method, after_epoch=after_epoch)

    def checkpoint(self, name: str, stage: str, method: str | None = None):
        """(state to resume from or None, callback saving each epoch) for a stage's per-epoch checkpoint.
        History records after the checkpoint's epoch are dropped: the resumed epochs write them again."""
        path = self.ckpt / f"{name}.pt"
        state = torch.load(path, weights_only=True) if path.is_file() else None
        self.clear_history(stage, method, int(state["epoch"]) if state else 0)
        return state, lambda epoch, st: self.save(st, path)

    def drop_checkpoint(self, name: str) -> None:
        """Remove checkpoints/<name>.pt once its stage's final model is saved (rank 0)."""
        if self.main:
            (self.ckpt / f"{name}.pt").unlink(missing_ok=True)

    def epoch_cb(self, total: int, label: str):
        """A callback taking one history record per epoch: history.jsonl and progress."""
        def cb(rec: dict) -> None:
            self.w.history(**rec)
            self.progress(f"{label}" + (f" ({rec['method']})" if rec.get("method") else ""), rec["epoch"], total,
                          " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)))
        return cb

    def want_checkpoint(self, epoch: int, total: int) -> bool:
        """Whether `epoch` writes a checkpoint (`train.checkpoint_every`, and always the last)."""
        return epoch % self._every == 0 or epoch == total


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
        run.io.log(f"{scored_key(spec.label, scorer)}: {ranking}threshold flags {metrics['flagged_normal']:.1f} % of "
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
            (run.io.ckpt / name).unlink(missing_ok=True)
    run.io.w.update_info(status="partial" if skipped else "done", skipped_methods=skipped or [],
                      finished=time.time(), wall_time_s=time.time() - t0, stage_seconds=getattr(run, "seconds", {}))
    run.io.progress("done", 1, 1)
    run.io.log(f"done in {time.time() - t0:.1f} s")


def mark_stopped(run, exc: BaseException) -> None:
    """Record why a run stopped (failed, or interrupted by the user) in run.json and the log."""
    run.io.w.update_info(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      error=f"{exc.__class__.__name__}: {exc}")
    run.io.log(f"stopped: {exc.__class__.__name__}: {exc}")


def write_language_explainer(run) -> None:
    """language.npz in the run folder (cmg_core.language): what a new image is close to in words. Needs a frozen E1 trunk and
    the text model (to embed the dictionary); skipped with a log line otherwise."""
    from ..bliss import load_dictionary
    from ..errors import CMGError
    from ..language import build_explainer

    cfg, n = run.cfg, run.n_train
    if cfg.e1.encoder != "frozen":
        return
    try:
        words = load_dictionary(cfg.bliss.dictionary)
        word_emb = run_text_encoder(run).encode(words)
        try:
            labels = run.clusters_and_weights()[0]
        except CMGError:  # fewer training images than caption clusters
            labels = np.zeros(n, dtype=int)
        caps = [list(run.ds[i].captions) for i in run.rows[:n]]
        lin = run_text_space_map(run)
        exp = build_explainer(lin.weight.detach().numpy(), lin.bias.detach().numpy(), run.caption_mean[:n].numpy(),
                              caps, run.captions[:n].numpy(), labels, words, word_emb)
        exp.save(run.run_dir / "language.npz")
    except (CMGError, OSError, ImportError) as exc:
        run.io.log(f"language explanations skipped: {exc}")
