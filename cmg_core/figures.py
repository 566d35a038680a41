"""Data behind the paper's analysis figures, computed from an experiment's run folders.

fig1  V-measure of k-means clusters and linear-probe accuracy: image features vs caption features
fig5  distance correlation among raw images, CMER-masked images, white noise and uniform noise
fig6  2-D t-SNE and UMAP of E2 embeddings for SSD and CMG (class and normal/anomaly labels)
fig7  CMLE vs MSE distillation: AUROC per task
fig8  RID accuracy per epoch;  fig9  CMG AUROC by mask type (hard/soft) with RID accuracy
fig10 test AUROC per epoch for CMG and SSD (recorded for plots only)
Each is written to <experiment>/analysis/<fig>.json; dcor and latent also go to the latent task's run folder
(analysis/dcor.json, analysis/latent.json), where the app reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .analysis import EMBED_METHODS, dcor_matrix, embed_2d
from .config import RunConfig, mask_apply
from .data import load_data
from .features import cached_mask_features, load_images, masked_variants, to_float
from .encoders import caption_tensor
from .train.frozen import build_trunk
from .methods import parse_method
from .runs import Run, method_slug, write_json
from .stages import mean_caption_embedding
from .utils import resolve_device


def modality_structure(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Fig.1: how well classes separate in each modality. (N, Di), (N, Dt), (N,) -> V-measure and
    5-fold linear-probe accuracy for each."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import v_measure_score
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = len(np.unique(labels))
    out = {}
    for name, x in (("image", image_feats), ("caption", text_feats)):
        pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        acc = cross_val_score(probe, x, labels, cv=5)
        out[name] = {"v_measure": float(v_measure_score(labels, pred)), "linear_probe_acc": float(acc.mean()),
                     "linear_probe_acc_std": float(acc.std())}
    return out


def pixel_dcor(images: torch.Tensor, masked: torch.Tensor, seed: int = 0) -> dict:
    """Fig.5: dcor among raw images, CMER-masked images, white (gaussian) and uniform noise of the same shape.

    images, masked: (N, 3, S, S) float in [0,1]. Returns plain and bias-corrected matrices.
    """
    gen = torch.Generator().manual_seed(seed)
    arrays = {"raw images": images, "CMER-masked images": masked,
              "white noise": torch.randn(images.shape, generator=gen),
              "uniform noise": torch.rand(images.shape, generator=gen)}
    arrays = {k: v.reshape(len(v), -1).numpy().astype(np.float64) for k, v in arrays.items()}
    plain = dcor_matrix(arrays)
    corrected = dcor_matrix(arrays, bias_corrected=True)
    return {"names": list(arrays), "matrix": plain.values.tolist(), "matrix_bias_corrected": corrected.values.tolist(),
            "n_images": int(images.shape[0])}


def latent_maps(run: Run, methods=("ssd", "cmg"), seed: int = 0, algos=EMBED_METHODS) -> dict:
    """Fig.6: t-SNE and UMAP (`algos`) coordinates of E2 embeddings, aligned with the run's images.csv rows (every
    method of `methods` or whose base method is one of them, e.g. `cmg[supcon]`, that has embeddings)."""
    images = run.images()
    out = {"rows": images.row.tolist(), "class_name": images.class_name.tolist(),
           "is_anomaly": images.is_anomaly.tolist(), "methods": {}}
    for m in [m for m in run.methods if m in methods or parse_method(m).base in methods]:
        if not (run.path / "embeddings" / f"{method_slug(m)}.npy").is_file():
            continue
        emb = run.embeddings(m)
        out["methods"][m] = {alg: embed_2d(emb, alg, seed=seed).round(4).tolist() for alg in algos}
    return out


def has_latent_maps(run: Run) -> bool:
    """Whether the run's analysis/latent.json exists and is newer than every embeddings file (a reused task's)."""
    lat = run.path / "analysis" / "latent.json"
    if not lat.is_file():
        return False
    return all(p.stat().st_mtime_ns <= lat.stat().st_mtime_ns for p in (run.path / "embeddings").glob("*.npy"))


RUN_MAPS = ("tsne",)  # what every finished run gets: the Latent page's first view (UMAP is computed on request)


def write_latent_maps(run: Run, seed: int = 0, algos=EMBED_METHODS) -> dict:
    """`latent_maps` into the run's analysis/latent.json (where the app's Latent page reads them), when the run has
    SSD or CMG embeddings. Returns the maps."""
    lat = latent_maps(run, seed=seed, algos=algos)
    if lat["methods"]:
        write_json(run.path / "analysis" / "latent.json", lat)
    return lat


def write_missing_latent_maps(runs, seed: int = 0, algos=RUN_MAPS) -> list[Run]:
    """`write_latent_maps` for each run without current maps (`has_latent_maps`), so the app's Latent page opens at
    once on every run of an experiment; returns the runs written."""
    todo = [run for run in runs if not has_latent_maps(run)]
    for run in todo:
        write_latent_maps(run, seed=seed, algos=algos)
    return todo


def history_curves(runs: dict[int, Run], stage: str, columns: list[str], methods=None) -> list[dict]:
    """Per-epoch records of one stage across tasks (Fig.8 RID accuracy, Fig.10 AUROC per epoch)."""
    rows = []
    for seed, run in runs.items():
        h = run.history()
        if h.empty:
            continue
        h = h[h.stage == stage]
        if methods is not None:
            h = h[h.method.map(lambda m: isinstance(m, str) and parse_method(m).base in methods)]
        for _, r in h.iterrows():
            rows.append({"seed": seed, "method": r.get("method"), "epoch": int(r.epoch),
                         **{c: (None if pd.isna(r.get(c)) else float(r.get(c))) for c in columns if c in r}})
    return rows


def write_run_analyses(run: Run, cfg: RunConfig) -> tuple[dict, dict]:
    """Fig.5 (pixel dcor on a seeded sample of the run's images) and Fig.6 (latent maps) into the run's own
    analysis/ folder, where the app reads them. Returns (dcor, latent)."""
    images, cmer = run.images(), run.cmer()
    rng = np.random.default_rng(cfg.train.seed)
    pick = np.sort(rng.choice(len(images), size=min(cfg.experiment.dcor_samples, len(images)), replace=False))
    ds = load_data(cfg.data)
    x = to_float(load_images(ds, images["index"].values[pick], cfg.data.image_size))
    variants = masked_variants(x, cfg.cmer.n_regions, cfg.cmer.mask, cfg.cmer.soft_value)
    chosen = variants[torch.arange(len(pick)), torch.from_numpy(cmer.cmer_label.values[pick])]
    small = cfg.experiment.dcor_pixels
    down = lambda t: torch.nn.functional.interpolate(t, size=(small, small), mode="area")  # noqa: E731
    dc = pixel_dcor(down(x), down(chosen), seed=cfg.train.seed)
    write_json(run.path / "analysis" / "dcor.json", dc)
    return dc, write_latent_maps(run, seed=cfg.train.seed)


def write_analyses(cfg: RunConfig, exp_dir: Path, runs: dict[int, Run], mask_runs: dict[int, Run],
                   per_task: pd.DataFrame, log: Callable[[str], None] = print) -> None:
    out = exp_dir / "analysis"
    seeds = list(runs)
    latent_run = runs[seeds[min(cfg.experiment.latent_seed_index, len(seeds) - 1)]]

    # Fig.1 on the whole dataset: cached trunk features vs mean caption embeddings
    device = resolve_device(cfg.train.device)
    ds = load_data(cfg.data)
    trunk = build_trunk(cfg, device)
    orig, _ = cached_mask_features(ds, trunk, cfg.data.image_size, cfg.cmer.n_regions, cfg.cmer.mask,
                                   cfg.cmer.soft_value, apply=mask_apply(cfg), trunk_size=cfg.model.trunk_image_size)
    text = mean_caption_embedding(caption_tensor(ds, np.arange(len(ds)), cfg.model.text_model)).numpy()
    write_json(out / "fig1.json", modality_structure(orig, text, ds.labels, seed=cfg.train.seed))
    log("analysis: fig1 (modality structure) written")

    dc, lat = write_run_analyses(latent_run, cfg)
    write_json(out / "fig5.json", dc)
    write_json(out / "fig6.json", lat)
    log("analysis: fig5 (distance correlation) and fig6 (t-SNE / UMAP) written")

    fig7 = per_task.method.map(lambda m: parse_method(m).base).isin(["cmg", "cmg-mse"])
    write_json(out / "fig7.json", per_task[fig7 & (per_task.scorer == "mahalanobis")].to_dict("records"))
    write_json(out / "fig8.json", history_curves(runs, "rid", ["train_acc", "val_acc", "chance"]))
    fig9 = []
    for seed, run in runs.items():
        variants_runs = {cfg.cmer.mask: run, **({("soft" if cfg.cmer.mask == "hard" else "hard"): mask_runs[seed]}
                                                 if seed in mask_runs else {})}
        for mask, r in variants_runs.items():
            rid = r.history().query("stage == 'rid'")
            fig9.append({"seed": seed, "mask": mask, "auroc": r.metrics().get("cmg", {}).get("auroc"),
                         "rid_val_acc": float(rid.val_acc.iloc[-1]) if len(rid) and "val_acc" in rid else None})
    write_json(out / "fig9.json", fig9)
    write_json(out / "fig10.json", history_curves(runs, "e2", ["auroc"], methods=["cmg", "ssd"]))
    for seed, run in runs.items():  # every task run can show its own Fig.9 point in the app
        write_json(run.path / "analysis" / "fig9.json", fig9)
    log("analysis: fig7-fig10 written")
    done = write_missing_latent_maps([*runs.values(), *mask_runs.values()], seed=cfg.train.seed)
    log(f"analysis: latent maps of {len(done)} more task run(s) written")
