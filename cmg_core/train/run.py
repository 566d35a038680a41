"""One training run, both profiles: data -> caption embeddings -> E1 + CMER -> RID -> E2 per method ->
detector -> run folder. Written once; a profile only decides how image features are produced:

* `frozen`: E1 is a head on a frozen pretrained trunk's cached features (`frozen.FrozenE1`), E2 a head on
  cached features of augmented views (`frozen.HeadE2`).
* `end2end`: E2 is an encoder trained on the images (`end2end.End2EndE2`); E1 is the frozen trunk + head by
  default (`e1.encoder: frozen`) or trained end to end too (`e1.encoder: end2end`).

Every finished stage is saved and E1/RID/E2 checkpoint every epoch, so an interrupted run resumes where it
stopped (`cmg train` on the same run folder). Under torchrun (end2end) rank 0 writes every file and computes
E1/CMER/RID (frozen E1), GMM and LLE; results the other ranks need are broadcast.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .. import distributed as D
from ..cmle import cmle_weights, fit_caption_clusters
from ..config import RunConfig, mask_apply, save_config
from ..data import load_data, make_task
from ..detector import detector_from_state
from ..errors import CMGError, ConfigError, DataError
from ..features import load_images
from ..masks import grid_masks
from ..protocol import Scoring, departures, run_scoring, scoring_masks, scoring_needs
from ..runs import RunWriter, method_slug, write_csv, write_npy
from ..encoders import caption_tensor
from ..stages import mean_caption_embedding
from ..utils import resolve_device, resolve_trunk_precision, seed_everything
from ..artifacts import load_model, model_path
from ..methods import MethodSpec, check_needs, parse_method, run_needs
from .context import StageContext
from .devices import Devices
from .end2end import End2EndE1, End2EndE2
from .frozen import FrozenE1, HeadE2, TrunkFeatures
from .detectors import fit_detectors
from .untrained import untrained_features, untrained_model
from .objective import build_guidance, cmda_pairs
from .evaluate import epoch_evaluator, report_best_epoch, scored_features
from .rid import rid_stage
from .records import (RunIO, check_resume, finish_run, mark_stopped, score_method, write_language_explainer,
                      write_results)

Progress = Callable[[str, int, int], None]


class Training:
    """One run while it trains; `run()` is the whole straight line. The feature backends and RID's stage get a
    `StageContext` (the task's rows and config, `Devices`, `RunIO`) and the earlier stages' results as arguments;
    what this class holds is the pipeline's own state between stages."""

    def __init__(self, cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False,
                 extra_scorings: tuple[Scoring, ...] = ()):
        self.cfg = cfg
        self.scoring = run_scoring(cfg.protocol)  # how the detectors' features are extracted (cmg_core.protocol)
        self.extra_scorings = tuple(s for s in extra_scorings if s != self.scoring)  # cmg audit: per-epoch AUROCs too
        self.dist = D.init_distributed() if cfg.model.profile == "end2end" else D.DistInfo()
        self.main = self.dist.rank == 0
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.mask_apply = mask_apply(cfg)
        self._clusters = self._e2 = None
        self.feats = None  # the frozen trunk's features (frozen.TrunkFeatures), when a stage needs them
        self.captions = self.caption_mean = None  # caption embeddings, when a method reads captions
        self.cmer_label = self.rid_choice = self.rid_test_choice = None  # masks, when a method's needs ran them
        error, writer = None, None
        if self.main:
            try:
                check_resume(self.run_dir, cfg, overwrite)
                writer = RunWriter(self.run_dir)
            except CMGError as exc:
                error = (type(exc).__name__, str(exc))
        error = D.broadcast_object(error)
        if error is not None:
            D.cleanup(self.dist)
            raise (DataError if error[0] == "DataError" else ConfigError)(error[1])
        self.io = RunIO(self.run_dir, self.main, writer, progress, cfg.train.checkpoint_every)

    # --- stages ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        device = D.device_for(resolve_device(cfg.train.device), self.dist)
        self.dev = Devices(device, bool(cfg.train.amp) and device.type == "cuda", self.dist, self.io.log)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.main:  # rank 0 first: generating a dataset cache is not safe to do concurrently
            self.ds = load_data(cfg.data)
        D.barrier()
        if not self.main:
            self.ds = load_data(cfg.data)
        t = self.task = make_task(self.ds, cfg.task.normal_classes, cfg.task.n_normal, cfg.task.seed,
                                  cfg.task.holdout)
        self.rows = np.concatenate([t.train_idx, t.test_idx])
        self.n_train = len(t.train_idx)
        self.is_anomaly = np.concatenate([np.zeros(self.n_train, int), t.test_is_anomaly])
        ids = {c: i for i, c in enumerate(t.normal_classes)}  # normal-class index 0..C-1 (she); -1: anomaly
        labels = self.ds.labels
        self.class_labels = np.array([ids.get(int(labels[r]), -1) for r in self.rows])
        self.roles = np.array(["train"] * self.n_train + ["test"] * len(t.test_idx))
        self.ctx = StageContext(cfg, self.ds, self.rows, self.n_train, self.mask_apply, self.dev, self.io)
        self.specs = [parse_method(m, cfg.cmle.loss) for m in cfg.train.methods]
        self.needs = run_needs(self.specs) | scoring_needs((self.scoring, *self.extra_scorings))
        check_needs(self.specs, self.ds, cfg.data)
        if not self.main:
            return
        save_config(cfg, self.run_dir / "config.yaml")
        self.io.w.update_info(name=cfg.name, status="running", created=time.time(), profile=cfg.model.profile,
                           methods=list(cfg.train.methods), method_labels={s.name: s.label for s in self.specs},
                           dataset={"name": cfg.data.name, "root": cfg.data.root}, class_names=self.ds.class_names,
                           normal_classes=list(t.normal_classes), n_regions=cfg.cmer.n_regions, mask=cfg.cmer.mask,
                           mask_apply=self.mask_apply, e1_encoder=cfg.e1.encoder, image_size=cfg.data.image_size,
                           trunk_precision=resolve_trunk_precision(cfg.model.trunk_precision, device),
                           device=str(device), world_size=self.dist.world_size, host=platform.node(), error=None,
                           departures=departures(cfg.protocol))
        items = [self.ds[i] for i in self.rows]
        write_csv(self.run_dir / "images.csv", pd.DataFrame({
            "row": np.arange(len(self.rows)), "index": self.rows, "image_id": [it.image_id for it in items],
            "path": [str(it.path) for it in items], "class_id": [it.class_id for it in items],
            "class_name": [it.class_name for it in items], "role": self.roles, "is_anomaly": self.is_anomaly,
            "captions": [" | ".join(it.captions) for it in items]}))
        self.io.log(f"task: {t.describe(self.ds)}; device {device}; {self.dist.world_size} process(es); "
                 f"profile {cfg.model.profile}")

    def text(self) -> None:
        self.io.progress("text embeddings", 0, 1)
        caps = (caption_tensor(self.ds, self.rows, self.cfg.model.text_model, str(self.dev.device)) if self.main
                else None)
        self.captions = D.broadcast_object(caps).float()  # (R, C, T) on CPU
        self.caption_mean = mean_caption_embedding(self.captions)
        self.io.progress("text embeddings", 1, 1)

    def images_on_device(self) -> None:
        s = self.cfg.data.image_size
        self.io.progress("images", 0, 1)
        self.dev.hold(load_images(self.ds, self.rows, s),  # (R, 3, S, S) uint8
                      grid_masks(s, s, self.cfg.cmer.n_regions, self.cfg.cmer.mask, self.cfg.cmer.soft_value))
        self.io.progress("images", 1, 1)

    def needs_trunk(self) -> bool:
        """Whether the run needs the frozen trunk's features: the frozen profile's E2 heads, a frozen E1, or a
        method without E2 (raw, bliss)."""
        frozen_e1 = "e1" in self.needs and self.cfg.e1.encoder == "frozen"
        return self.cfg.model.profile == "frozen" or frozen_e1 or any(not s.trained for s in self.specs)

    def trunk_features(self) -> None:
        """The frozen trunk's features of every row (rank 0), with masked variants only when CMER needs them."""
        masked = "e1" in self.needs and self.cfg.e1.encoder == "frozen"
        self.feats = TrunkFeatures(self.ctx, masked=masked) if self.main else None

    def e1_and_cmer(self) -> None:
        """E1 (Eq.1) and CMER's labels (Eq.2); RID's inputs are kept for `rid`."""
        cfg = self.cfg
        if cfg.e1.encoder == "end2end":
            self.e1 = End2EndE1(self.ctx, self.captions)
            out = self.e1.train_and_score()
        else:
            self.e1 = FrozenE1(self.ctx, self.feats, self.captions) if self.main else None
            out = self.e1.train_and_score() if self.main else None
        out = D.broadcast_object(out if self.main else None)
        self.e1_scores, self.rid_orig, self.rid_masked = out
        self.cmer_label = self.e1_scores.argmax(1)
        m = cfg.cmer.n_regions
        self.io.log(f"CMER labels on training images: {np.bincount(self.cmer_label[: self.n_train], minlength=m).tolist()}"
                 f" (M={m})")

    def rid(self) -> None:
        test_select = any(s.uses_rid_test for s in (self.scoring, *self.extra_scorings))
        out = (rid_stage(self.ctx, self.e1_scores, self.rid_orig, self.rid_masked, self.cmer_label, self.roles,
                         self.is_anomaly, test_select) if self.main else None)
        self.rid_probs, self.rid_test_choice = D.broadcast_object(out)
        self.rid_choice = self.rid_probs.argmax(1)

    def scoring_masks(self, spec: MethodSpec, scoring: Scoring) -> np.ndarray | None:
        """(R,) the mask index of each row when `spec`'s features are scored under `scoring` (-1 unmasked)."""
        choices = {"rid": self.rid_choice, "captions": self.cmer_label,
                   "rid_test": self.rid_test_choice}  # None where the run's needs did not run the stage
        return scoring_masks(scoring, spec.er, choices, self.is_anomaly)

    def items_per_image(self) -> int:
        """How often an E2 epoch passes each training image: once, or once per caption (protocol.train_items)."""
        return int(self.captions.shape[1]) if self.cfg.protocol.train_items == "captions" else 1

    def clusters_and_weights(self):
        """(GMM caption-cluster labels (N,), LLE weights (N, N) csr) of the training images; once per run."""
        if self._clusters is None:
            out = None
            if self.main:
                cfg = self.cfg
                emb = self.caption_mean[: self.n_train].numpy().astype(np.float64)
                k = cfg.cmle.n_clusters
                if k > len(emb):
                    out = f"cmle.n_clusters={k} is larger than the {len(emb)} normal training images"
                else:
                    labels, _ = fit_caption_clusters(emb, k, cfg.cmle.covariance_type, seed=self.ctx.stage_seed(4))
                    out = (labels, cmle_weights(emb, labels, cfg.cmle.n_neighbors, cfg.cmle.reg).tocsr())
                    self.io.log(f"CMLE: GMM cluster sizes {np.bincount(labels, minlength=k).tolist()}")
            out = D.broadcast_object(out)
            if isinstance(out, str):
                raise ConfigError(out)
            self.gmm_labels = out[0]
            self._clusters = out
        return self._clusters

    def cmda_pairs(self):
        """(cmda config section, partners (N, k), weights (N, k)) of the training images (objective.cmda_pairs)."""
        n, c = self.n_train, self.cfg.cmda
        partners, weights = cmda_pairs(self.e1.model, self.feats.orig[:n], self.captions[:n], c.neighbors, c.max_mix)
        self.io.log(f"CMDA: {partners.shape[1]} partners per image, mean weight {weights.mean():.3f}")
        return c, partners, weights

    def e2_backend(self):
        if self._e2 is None:
            per_image = self.items_per_image()
            self._e2 = (HeadE2(self.ctx, self.feats, self.cmer_label, per_image) if self.cfg.model.profile == "frozen"
                        else End2EndE2(self.ctx, self.cmer_label, per_image))
        return self._e2

    def train_method(self, spec: MethodSpec) -> dict:
        """Train (or load) a method's E2 and fit its detectors: {scored key: {"scores", "metrics"}} on rank 0."""
        cfg, n = self.cfg, self.n_train
        final = model_path(self.io.models, method_slug(spec.name))
        backend = self.e2_backend() if spec.trained else None
        if self.io.exists(final):
            if not self.main:
                return {}
            weights, states, meta = load_model(final)
            model = untrained_model(self, spec, weights)
            if spec.trained:
                model = backend.build(meta["text_dim"] or None)
                model.load_state_dict(weights)
            h = self.method_features(backend, model, spec)
            dets = {s: detector_from_state(s, states[s]) for s in self.scorers(spec) if s in states}
            dets.update(fit_detectors(self, spec, h, [s for s in self.scorers(spec) if s not in dets], model))  # added since
        else:
            model, text_dim = untrained_model(self, spec), 0
            if spec.trained:
                caps = self.caption_mean[:n] if self.caption_mean is not None else None
                g = build_guidance(spec, caps, cfg.cmle, cfg.e2.mse_weight, self.clusters_and_weights,
                                   self.class_labels[:n], self.cmda_pairs,
                                   supcon_per_batch=cfg.protocol.supcon_labels == "batch")
                model = backend.train(spec, g, epoch_evaluator(self, backend, spec, self.extra_scorings))
                text_dim = g.head_dim
                if not self.main:
                    D.barrier()
            if not self.main:
                return {}
            h = self.method_features(backend, model, spec)
            dets = fit_detectors(self, spec, h, self.scorers(spec), model)
            self.io.save_model(final, model.state_dict() if model is not None else {},
                            {s: d.state_dict() for s, d in dets.items()}, method=spec.name, text_dim=int(text_dim),
                            uses_er=spec.er)
            if spec.trained:
                self.io.drop_checkpoint(f"e2_{method_slug(spec.name)}")  # superseded by the final model
                D.barrier()
        write_npy(self.run_dir / "embeddings" / f"{method_slug(spec.name)}.npy", h.astype(np.float32))
        return report_best_epoch(self, spec, score_method(self, spec, h, dets))

    def scorers(self, spec: MethodSpec) -> list[str]:
        """The method's own scoring rule (bliss), else every one of `detector.scorers`."""
        return spec.scorers(self.cfg.detector.scorers)

    def method_features(self, backend, model, spec: MethodSpec) -> np.ndarray:
        """(R, D) features the detectors score: E2's, or for raw / bliss the trunk's / E1's (no training)."""
        if spec.trained:
            return scored_features(self, backend, model, spec, self.scoring)
        return untrained_features(self, spec, model)

    def run(self) -> Path:
        t0 = time.time()
        self.seconds = {}  # wall time per stage -> run.json stage_seconds (how a task's time splits)

        def timed(name, fn, *args):
            t = time.time()
            out = fn(*args)
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t, 2)
            return out

        try:
            timed("data", self.prepare)  # then only the stages a chosen method needs (cmg_core.methods)
            if "captions" in self.needs:
                timed("text", self.text)
            if self.cfg.model.profile == "end2end":
                timed("data", self.images_on_device)
            if self.needs_trunk():
                timed("trunk", self.trunk_features)
            if "e1" in self.needs:
                timed("e1+cmer", self.e1_and_cmer)
            if "rid" in self.needs:
                timed("rid", self.rid)
            results, skipped = {}, []
            deadline = float(os.environ.get("CMG_DEADLINE", "inf"))  # unix time; set by time-boxed drivers
            for i, spec in enumerate(self.specs):
                if time.time() > deadline:
                    skipped = [s.name for s in self.specs[i:]]
                    self.io.log(f"time budget (CMG_DEADLINE) reached: stopping before {skipped}")
                    break
                self.io.progress("methods", i, len(self.specs), spec.name)
                results.update(timed(f"e2 {spec.name}", self.train_method, spec))
                if self.main:  # finished methods are on disk even if the process is stopped later
                    write_results(self, results)
            if self.main:
                if "captions" in self.needs and self.feats is not None:  # explanations in words need text
                    timed("language", write_language_explainer, self)
                finish_run(self, results, t0, skipped)
        except BaseException as exc:
            if self.main:
                mark_stopped(self, exc)
            D.cleanup(self.dist, wait=False)
            raise
        D.cleanup(self.dist)
        return self.run_dir


def train_run(cfg: RunConfig, progress: Progress | None = None, overwrite: bool = False,
              extra_scorings: tuple[Scoring, ...] = ()) -> Path:
    """Train every method of `cfg` and write the run folder; returns its path. Under torchrun every process
    calls this (end2end profile); rank 0 writes the run folder. extra_scorings: per-epoch test AUROCs of each
    trained method under these scorings too (history keys `auroc|<scoring key>`; `cmg audit`)."""
    return Training(cfg, progress=progress, overwrite=overwrite, extra_scorings=extra_scorings).run()
