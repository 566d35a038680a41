"""One training run, `cpu` profile: data -> text + trunk features -> E1 -> CMER -> RID -> E2 per method ->
detector -> run folder. Every finished stage is saved, and E2 checkpoints every epoch, so an interrupted run
resumes where it stopped (`cmg train` on the same run folder).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .cmle import cmle_weights, fit_caption_clusters
from .config import RunConfig, load_config, mask_apply, save_config, to_dict
from .data import load_dataset, make_task
from .detector import MahalanobisDetector
from .encoders import TextEncoder
from .errors import ConfigError
from .features import Trunk, augmented_view_features, cached_mask_features
from .metrics import detection_metrics
from .runs import RunWriter, method_slug, write_csv, write_json, write_npy
from .stages import (E1Model, E2Objective, e2_features, mean_caption_embedding, rid_predict, train_e1,
                     train_e2_head, train_rid)
from .models import RID, E2Head, ImageHead, TextProjection
from .utils import resolve_device, seed_everything

USES_ER = {"ssd": False, "ssd+er": True, "ssd+le": False, "cmg": True, "cmg-mse": True}
USES_LE = {"ssd": False, "ssd+er": False, "ssd+le": True, "cmg": True, "cmg-mse": False}
USES_MSE = {"ssd": False, "ssd+er": False, "ssd+le": False, "cmg": False, "cmg-mse": True}
Progress = Callable[[str, int, int], None]


def caption_tensor(dataset, rows: np.ndarray, encoder: TextEncoder) -> torch.Tensor:
    """(R, C, T) caption embeddings of the given dataset rows; images with fewer captions repeat theirs."""
    caps = [list(dataset[i].captions) for i in rows]
    c = max(len(x) for x in caps)
    flat = [x[j % len(x)] for x in caps for j in range(c)]
    emb = encoder.encode(flat)
    return torch.from_numpy(emb).view(len(rows), c, -1)


def _check_resume(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    old = run_dir / "config.yaml"
    if not old.is_file():
        return
    if overwrite:
        import shutil

        shutil.rmtree(run_dir)
        return
    previous = load_config(old)
    ignore = {"out_dir"}
    a = {k: v for k, v in to_dict(previous).items() if k not in ignore}
    b = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    if a != b:
        raise ConfigError(f"run folder {run_dir} already holds a run with a different config; "
                          "choose another name (--set name=...) or pass --overwrite")


class Pipeline:
    """State of one run while it trains. `run()` is the whole straight line."""

    def __init__(self, cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir) / cfg.name
        _check_resume(self.run_dir, cfg, overwrite)
        self.w = RunWriter(self.run_dir)
        self._progress_cb = progress
        self.ckpt = self.run_dir / "checkpoints"
        self.models = self.run_dir / "models"

    # --- bookkeeping ------------------------------------------------------------------------------
    def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.w.progress(stage, done, total, message)
        if self._progress_cb:
            self._progress_cb(stage, done, total)

    def log(self, msg: str) -> None:
        self.w.log(msg)

    def _stage_seed(self, k: int) -> int:
        return self.cfg.train.seed * 1000 + k

    # --- stages -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        if cfg.model.profile != "cpu":
            raise ConfigError("Pipeline runs the cpu profile; the paper profile is run by cmg_core.paper")
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.ds = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
        self.task = make_task(self.ds, cfg.task.normal_classes, cfg.task.n_normal, cfg.task.seed, cfg.task.holdout)
        t = self.task
        self.rows = np.concatenate([t.train_idx, t.test_idx])
        self.n_train = len(t.train_idx)
        self.is_anomaly = np.concatenate([np.zeros(self.n_train, int), t.test_is_anomaly])
        self.roles = np.array(["train"] * self.n_train + ["test"] * len(t.test_idx))
        save_config(cfg, self.run_dir / "config.yaml")
        self.w.update_info(name=cfg.name, status="running", created=time.time(), profile=cfg.model.profile,
                           methods=list(cfg.train.methods), dataset={"name": cfg.data.name, "root": cfg.data.root},
                           class_names=self.ds.class_names, normal_classes=list(t.normal_classes),
                           n_regions=cfg.cmer.n_regions, mask=cfg.cmer.mask, mask_apply=mask_apply(cfg),
                           image_size=cfg.data.image_size,
                           device=str(self.device), host=platform.node(), error=None)
        items = [self.ds[i] for i in self.rows]
        write_csv(self.run_dir / "images.csv", pd.DataFrame({
            "row": np.arange(len(self.rows)), "index": self.rows, "image_id": [it.image_id for it in items],
            "path": [str(it.path) for it in items], "class_id": [it.class_id for it in items],
            "class_name": [it.class_name for it in items], "role": self.roles, "is_anomaly": self.is_anomaly,
            "captions": [" | ".join(it.captions) for it in items]}))
        self.log(f"task: {t.describe(self.ds)}; device {self.device}")

    def features(self) -> None:
        cfg = self.cfg
        self.progress("text embeddings", 0, 1)
        self.text = TextEncoder(cfg.model.text_model, device=str(self.device))
        self.captions = caption_tensor(self.ds, self.rows, self.text)  # (R, C, T)
        self.caption_mean = mean_caption_embedding(self.captions)
        self.trunk = Trunk.build(cfg.model.backbone, cfg.model.pretrained, self.device,
                                 precision="bf16" if cfg.model.trunk_precision == "bf16" else "fp32",
                                 weights=cfg.model.backbone_weights, cifar_stem=cfg.model.cifar_stem)
        orig, masked = cached_mask_features(self.ds.paths, self.trunk, cfg.data.image_size, cfg.cmer.n_regions,
                                            cfg.cmer.mask, cfg.cmer.soft_value, progress=self.progress,
                                            apply=mask_apply(cfg))
        self.orig = torch.from_numpy(orig[self.rows])
        self.masked = torch.from_numpy(masked[self.rows])
        self.log(f"features: {tuple(self.orig.shape)} images, {tuple(self.masked.shape)} masked variants")

    def e1_and_cmer(self) -> None:
        cfg, tr = self.cfg, slice(0, self.n_train)
        path = self.models / "e1.pt"
        if path.is_file():
            state = torch.load(path, weights_only=False)
            self.e1 = E1Model(ImageHead(self.orig.shape[1], cfg.model.head_hidden, cfg.model.embed_dim),
                              TextProjection(self.captions.shape[-1], cfg.model.text_hidden, cfg.model.embed_dim))
            self.e1.image.load_state_dict(state["image"])
            self.e1.text.load_state_dict(state["text"])
        else:
            state, save = self._checkpoint("e1", "e1")
            self.e1 = train_e1(self.orig[tr], self.captions[tr], cfg.e1, cfg.model, self._stage_seed(1),
                               on_epoch=self._epoch_cb(cfg.e1.epochs, "E1"), state=state, on_checkpoint=save)
            torch.save({"image": self.e1.image.state_dict(), "text": self.e1.text.state_dict()}, path)
        self.e1_scores = self.e1.score(self.masked, self.captions, cfg.cmer.caption_reduce).numpy()  # (R, M)
        self.cmer_label = self.e1_scores.argmax(1)
        m = cfg.cmer.n_regions
        counts = np.bincount(self.cmer_label[: self.n_train], minlength=m)
        self.log(f"CMER labels on training images: {counts.tolist()} (M={m})")

    def rid(self) -> None:
        cfg, n = self.cfg, self.n_train
        path = self.models / "rid.pt"
        self.rid_model = RID(self.masked.shape[-1], tuple(cfg.cmer.rid_hidden))
        if path.is_file():
            self.rid_model.load_state_dict(torch.load(path, weights_only=True))
        else:
            gen = np.random.default_rng(self._stage_seed(2))
            val = np.zeros(n, bool)
            val[gen.permutation(n)[: int(round(cfg.cmer.rid_val_fraction * n))]] = True
            state, save = self._checkpoint("rid", "rid")
            labels = torch.from_numpy(self.cmer_label[:n]).long()
            self.rid_model = train_rid(self.masked[:n], self.orig[:n], labels, torch.from_numpy(val), cfg.cmer,
                                       self._stage_seed(2), on_epoch=self._epoch_cb(cfg.cmer.rid_epochs, "RID"),
                                       state=state, on_checkpoint=save)
            torch.save(self.rid_model.state_dict(), path)
        self.rid_probs = rid_predict(self.rid_model, self.masked, self.orig).numpy()
        self.rid_choice = self.rid_probs.argmax(1)
        m = cfg.cmer.n_regions
        cols = {f"e1_score_{j}": self.e1_scores[:, j] for j in range(m)}
        cols.update({f"rid_prob_{j}": self.rid_probs[:, j] for j in range(m)})
        write_csv(self.run_dir / "cmer.csv", pd.DataFrame({
            "row": np.arange(len(self.rows)), "role": self.roles, **cols, "cmer_label": self.cmer_label,
            "rid_choice": self.rid_choice, "agree": (self.cmer_label == self.rid_choice).astype(int)}))

    def _checkpoint(self, name: str, stage: str, method: str | None = None):
        """(state to resume from or None, callback saving each epoch) for a stage's per-epoch checkpoint.
        History records after the checkpoint's epoch are dropped: the resumed epochs write them again."""
        path = self.ckpt / f"{name}.pt"
        state = torch.load(path, weights_only=False) if path.is_file() else None
        self.w.clear_history(stage, method, after_epoch=int(state["epoch"]) if state else 0)
        return state, lambda epoch, st: torch.save(st, path)

    def _epoch_cb(self, total: int, label: str):
        def cb(rec: dict) -> None:
            self.w.history(**rec)
            self.progress(f"{label}" + (f" ({rec['method']})" if rec.get("method") else ""), rec["epoch"], total,
                          " ".join(f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)))
        return cb

    def _views(self, er: bool) -> torch.Tensor:
        cfg, name = self.cfg, ("views_er" if er else "views_plain")
        path = self.ckpt / f"{name}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        paths = [self.ds[i].path for i in self.rows[: self.n_train]]
        views = augmented_view_features(paths, self.cmer_label[: self.n_train] if er else None, self.trunk,
                                        cfg.data.image_size, cfg.cmer.n_regions, cfg.cmer.mask, cfg.cmer.soft_value,
                                        cfg.e2.n_views, self._stage_seed(3), progress=self.progress,
                                        apply=mask_apply(cfg))
        write_npy(path, views)
        return torch.from_numpy(views)

    def _lle_weights(self):
        if getattr(self, "_w", None) is None:
            cfg = self.cfg
            emb = self.caption_mean[: self.n_train].numpy().astype(np.float64)
            k = cfg.cmle.n_clusters
            if k > len(emb):
                raise ConfigError(f"cmle.n_clusters={k} is larger than the {len(emb)} normal training images")
            labels, _ = fit_caption_clusters(emb, k, cfg.cmle.covariance_type, seed=self._stage_seed(4))
            self._w = cmle_weights(emb, labels, cfg.cmle.n_neighbors, cfg.cmle.reg)
            self.gmm_labels = labels
            self.log(f"CMLE: GMM cluster sizes {np.bincount(labels, minlength=k).tolist()}")
        return self._w

    def method_features(self, method: str) -> torch.Tensor:
        """(R, F) trunk features E2 sees for each row: the RID-masked image for ER methods (train rows too,
        so the normal statistics are computed exactly as test images are processed), else the original."""
        if USES_ER[method]:
            return self.masked[torch.arange(len(self.rows)), torch.from_numpy(self.rid_choice)]
        return self.orig

    def train_method(self, method: str) -> dict:
        cfg, n, slug = self.cfg, self.n_train, method_slug(method)
        done = self.models / f"{slug}.pt"
        feats = self.method_features(method)
        test = slice(n, None)
        if done.is_file():
            state = torch.load(done, weights_only=False)
            head = E2Head(feats.shape[1], cfg.model.head_hidden, cfg.model.embed_dim, state.get("text_dim"))
            head.load_state_dict(state["model"])
            det = MahalanobisDetector.from_state_dict(state["detector"])
        else:
            er = USES_ER[method]
            clean = self.masked[torch.arange(n), torch.from_numpy(self.cmer_label[:n])] if er else self.orig[:n]
            objective = E2Objective(
                lle_weights=self._lle_weights() if USES_LE[method] else None, lle_weight=cfg.cmle.weight, lle_normalize=cfg.cmle.normalize,
                mse_targets=self.caption_mean[:n] if USES_MSE[method] else None, mse_weight=cfg.e2.mse_weight)
            state, save = self._checkpoint(f"e2_{slug}", "e2", method)

            def evaluate(head: E2Head) -> dict:  # plots only: never used to pick the model
                if not cfg.train.eval_every_epoch:
                    return {}
                h = e2_features(head, feats)
                d = MahalanobisDetector(cfg.detector.n_clusters, cfg.detector.covariance).fit(h[:n])
                return {"auroc": detection_metrics(self.is_anomaly[test], d.score(h[test]))["auroc"]}

            head = train_e2_head(self._views(er), clean, cfg.e2, cfg.model, objective, self._stage_seed(5), method,
                                 on_epoch=self._epoch_cb(cfg.e2.epochs, "E2"), evaluate=evaluate, state=state,
                                 on_checkpoint=save)
            h = e2_features(head, feats)
            det = MahalanobisDetector(cfg.detector.n_clusters, cfg.detector.covariance, seed=cfg.train.seed).fit(h[:n])
            torch.save({"model": head.state_dict(), "detector": det.state_dict(), "method": method,
                        "text_dim": objective.mse_targets.shape[1] if objective.mse_targets is not None else None,
                        "uses_er": er, "in_dim": feats.shape[1]}, done)
        h = e2_features(head, feats)
        write_npy(self.run_dir / "embeddings" / f"{slug}.npy", h.astype(np.float32))
        scores = det.score(h)
        metrics = detection_metrics(self.is_anomaly[test], scores[test])
        self.log(f"{method}: AUROC {metrics['auroc']:.2f} AUPR {metrics['aupr']:.2f} FPR95 {metrics['fpr95']:.2f}")
        return {"scores": scores, "metrics": metrics}

    def run(self) -> Path:
        t0 = time.time()
        try:
            self.prepare()
            self.features()
            self.e1_and_cmer()
            self.rid()
            results = {}
            for i, method in enumerate(self.cfg.train.methods):
                self.progress("methods", i, len(self.cfg.train.methods), method)
                results[method] = self.train_method(method)
            finish_run(self, results, t0)
        except BaseException as exc:
            mark_stopped(self, exc)
            raise
        return self.run_dir


def finish_run(run, results: dict, t0: float) -> None:
    """Write scores.csv and metrics.json of a finished run and mark it done (both profiles).

    `run` has run_dir, rows, roles, is_anomaly, w (RunWriter), progress() and log(); `results` maps each method
    to {"scores": (R,), "metrics": {...}}."""
    write_csv(run.run_dir / "scores.csv", pd.DataFrame(
        {"row": np.arange(len(run.rows)), "role": run.roles, "is_anomaly": run.is_anomaly,
         **{f"score_{m}": r["scores"] for m, r in results.items()}}))
    write_json(run.run_dir / "metrics.json", {m: r["metrics"] for m, r in results.items()})
    run.w.update_info(status="done", finished=time.time(), wall_time_s=time.time() - t0)
    run.progress("done", 1, 1)
    run.log(f"done in {time.time() - t0:.1f} s")


def mark_stopped(run, exc: BaseException) -> None:
    """Record why a run stopped (failed, or interrupted by the user) in run.json and the log."""
    run.w.update_info(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      error=f"{exc.__class__.__name__}: {exc}")
    run.log(f"stopped: {exc.__class__.__name__}: {exc}")


def train_run(cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Train every method of `cfg` and write the run folder; returns its path."""
    if cfg.model.profile == "paper":
        from .paper import train_paper_run

        return train_paper_run(cfg, progress=progress, overwrite=overwrite)
    return Pipeline(cfg, progress=progress, overwrite=overwrite).run()
