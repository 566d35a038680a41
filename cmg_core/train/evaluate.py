"""A trained model's features under a Scoring (cmg_core.protocol), the per-epoch test AUROCs (history.jsonl) and
the reported AUROC of `protocol.report_epoch: best` (the maximum of those per-epoch values: a departure).

Per-epoch AUROCs are recorded for plots (`train.eval_every_epoch`), for `report_epoch: best`, and for the extra
scorings `cmg audit` asks a run for; they never choose the stored model (models/ holds the final epoch's).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from ..methods import MethodSpec, primary_scorer, scored_key
from ..metrics import detection_metrics
from ..protocol import Scoring, auroc_key, class_pure_groups, evaluated_epoch
from ..utils import read_bounded_text
from .detectors import fit_detectors


def scored_features(run, backend, model, spec: MethodSpec, scoring: Scoring, cache: dict | None = None) -> np.ndarray:
    """(R, D) features of every row under `scoring`: masked as it says (ER methods), BatchNorm in eval mode, or in
    train mode over class-pure batches (training images, normal test images, anomalies: never mixed).

    cache: {key: features} shared by the scorings of one model. Eval mode keys single rows by (row, mask): a row's
    features do not depend on its batch; train mode keys a whole group by its masks."""
    masks = run.scoring_masks(spec, scoring)
    r = len(run.rows)
    if scoring.bn == "eval" and cache is None:
        return backend.embed(model, spec, masks=masks)
    if scoring.bn == "eval":
        mv = masks if masks is not None else np.full(r, -1)
        need = np.array([i for i in range(r) if (i, int(mv[i])) not in cache], dtype=np.int64)
        if len(need):
            for i, f in zip(need, backend.embed(model, spec, rows=need, masks=masks)):
                cache[(int(i), int(mv[i]))] = f
        return np.stack([cache[(i, int(mv[i]))] for i in range(r)])
    groups = class_pure_groups(run.n_train, run.is_anomaly)
    out = None
    for gid in np.unique(groups):
        rows = np.flatnonzero(groups == gid)
        key = ("bn=train", int(gid), None if masks is None else masks[rows].tobytes())
        feats = cache.get(key) if cache is not None else None
        if feats is None:
            feats = backend.embed(model, spec, rows=rows, masks=masks, bn="train")
            if cache is not None:
                cache[key] = feats
        if out is None:
            out = np.empty((r, feats.shape[1]), dtype=feats.dtype)
        out[rows] = feats
    return out


def epoch_evaluator(run, backend, spec: MethodSpec, extra: Sequence[Scoring] = ()):
    """evaluate(model, epoch) -> {history key: test AUROC} for a method's E2, or None when nothing is recorded
    (no per-epoch AUROC asked for, or a test set without both classes). Keys under the run's own scoring: `auroc`
    (the Mahalanobis score, for plots), or with report_epoch: best `auroc` / `auroc@knn` for each score the run
    reports; `auroc|<scoring key>` (the method's own score) for each extra scoring."""
    cfg, n = run.cfg, run.n_train
    y = run.is_anomaly[n:]
    wanted = cfg.train.eval_every_epoch or cfg.protocol.report_epoch == "best" or len(extra)
    if not wanted or not 0 < y.sum() < len(y):
        return None
    total = run.ctx.e2_config(spec).epochs
    quick = dataclasses.replace(cfg.detector, calibration_folds=0)  # a per-epoch AUROC needs no threshold
    own = primary_scorer(spec.name)
    best = cfg.protocol.report_epoch == "best"

    def evaluate(model, epoch: int) -> dict:
        if not evaluated_epoch(epoch, total, cfg.train.eval_every):
            return {}
        cache: dict = {}
        out = {}
        for scoring in (run.scoring, *extra):
            h = scored_features(run, backend, model, spec, scoring, cache)
            if scoring != run.scoring:
                keys = {own: auroc_key("", scoring.key)}
            elif best:  # every score the run reports
                keys = {s: auroc_key(scored_key(spec.name, s)[len(spec.name):]) for s in run.scorers(spec)}
            else:  # for the history plots: the Mahalanobis score of the method's features
                keys = {"mahalanobis": "auroc"}
            for s, det in fit_detectors(run, spec, h, list(keys), model, detector_cfg=quick).items():
                out[keys[s]] = detection_metrics(y, det.score(h[n:]))["auroc"]
        return out
    return evaluate


def history_records(run_dir, method: str) -> list[dict]:
    """The e2 history records of `method` in a run folder's history.jsonl, in epoch order."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in read_bounded_text(path).splitlines() if line.strip()]
    return sorted((r for r in recs if r.get("stage") == "e2" and r.get("method") == method), key=lambda r: r["epoch"])


def report_best_epoch(run, spec: MethodSpec, results: dict) -> dict:
    """`protocol.report_epoch: best`: each scored key's reported AUROC becomes the maximum of its per-epoch test
    AUROCs (the final epoch's stays as `auroc_final`, the epoch as `best_epoch`). Methods without epochs keep the
    final value."""
    if run.cfg.protocol.report_epoch != "best":
        return results
    recs = history_records(run.run_dir, spec.name)
    for key, res in results.items():
        if "auroc" not in res["metrics"]:
            continue
        hist = auroc_key(key[len(spec.name):])
        values = [(r[hist], r["epoch"]) for r in recs if hist in r]
        met = dict(res["metrics"], auroc_final=res["metrics"]["auroc"], best_epoch=None)
        if values:
            best, epoch = max(values, key=lambda v: (v[0], -v[1]))  # the earliest epoch on ties
            met.update(auroc=best, best_epoch=epoch)
        res["metrics"] = met
    return results
