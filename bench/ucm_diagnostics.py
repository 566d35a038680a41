"""Diagnostics behind the README's "Results" analysis, on the finished task runs of a `cmg experiment` folder.

    .venv/bin/python bench/ucm_diagnostics.py experiments/ucm_captions_dev      # e.g. dev seeds 100-104

Per task and mean over tasks (AUROC, test images of each run):
- `raw maha` / `raw knn5`: the frozen trunk's pooled features without any training, scored by one Gaussian
  (the detector) and by the mean distance to the 5 nearest normal training images (cosine) - what the
  frozen features allow before E1/E2;
- `<method> k1` / `<method> captions`: each method's E2 embeddings scored by the run's detector settings with
  one Gaussian, and with one Gaussian per caption-GMM cluster (CMLE's K clusters, min over clusters, Eq.14);
- LLE weight mass on an image's own class (how class-pure CMLE's caption neighbourhoods are);
- `raw drop <rule>`: ER on the raw trunk features - one Gaussian on the features with one region left out
  (`cmer.apply` of the run), the region picked by `cmer` (CMER's label from the captions, train and test
  images: an oracle at test time), `rid` (CMER's label for training images, RID's choice for test images:
  what the ER methods do), `random` (seeded), `worst` (the region whose removal lowers the caption match
  most); `raw maha` is "no region dropped".
Never used to choose the reported settings on the reported seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg_core.cmle import cmle_weights, fit_caption_clusters  # noqa: E402
from cmg_core.config import mask_apply  # noqa: E402
from cmg_core.data import load_data  # noqa: E402
from cmg_core.features import cached_mask_features  # noqa: E402
from cmg_core.metrics import detection_metrics  # noqa: E402
from cmg_core.encoders import caption_tensor  # noqa: E402
from cmg_core.train.frozen import build_trunk  # noqa: E402
from cmg_core.runs import Run  # noqa: E402
from cmg_core.detector import KNNDetector, MahalanobisDetector  # noqa: E402
from cmg_core.stages import mean_caption_embedding  # noqa: E402
from cmg_core.utils import resolve_device  # noqa: E402


def knn_scores(train: np.ndarray, test: np.ndarray, k: int = 5) -> np.ndarray:
    """The `knn` scorer of the detector (what `raw@knn` reports in a run)."""
    return KNNDetector(k, calibration_folds=0).fit(train).score(test)


def task_diagnostics(run: Run) -> dict[str, float]:
    cfg = run.config()
    images = run.images()
    rows = images["index"].to_numpy()
    n = int((images.role == "train").sum())
    y = images.is_anomaly.to_numpy()[n:]
    ds = load_data(cfg.data)
    trunk = build_trunk(cfg, resolve_device("cpu"))
    orig, masked = cached_mask_features(ds, trunk, cfg.data.image_size, cfg.cmer.n_regions, cfg.cmer.mask,
                                        cfg.cmer.soft_value, apply=mask_apply(cfg),
                                        trunk_size=cfg.model.trunk_image_size)
    raw = orig[rows].astype(np.float64)
    cov = cfg.detector.covariance
    auroc = lambda s: detection_metrics(y, s)["auroc"]  # noqa: E731
    def maha(f, labels=None):
        return MahalanobisDetector(1, cov).fit(f[:n], labels).score(f[n:])

    out = {"raw maha": auroc(maha(raw)),
           "raw knn5": auroc(knn_scores(raw[:n], raw[n:]))}
    cmer = run.cmer()
    e1 = cmer.filter(like="e1_score_").to_numpy()
    rng = np.random.default_rng(0)
    picks = {"cmer": e1.argmax(1),
             "rid": np.where(cmer.role == "train", cmer.cmer_label, cmer.rid_choice),
             "random": rng.integers(e1.shape[1], size=len(e1)),
             "worst": e1.argmin(1)}
    for rule, pick in picks.items():
        dropped = masked[rows, pick].astype(np.float64)
        out[f"raw drop {rule}"] = auroc(maha(dropped))
    caps = mean_caption_embedding(caption_tensor(ds, rows[:n], cfg.model.text_model)).numpy()
    labels, _ = fit_caption_clusters(caps.astype(np.float64), cfg.cmle.n_clusters, cfg.cmle.covariance_type,
                                     seed=cfg.train.seed * 1000 + 4)
    w = cmle_weights(caps.astype(np.float64), labels, cfg.cmle.n_neighbors, cfg.cmle.reg).tocsr()
    cls = images.class_id.to_numpy()[:n]
    same = [w[i].data[cls[w[i].indices] == cls[i]].sum() for i in range(n) if w[i].nnz]
    out["LLE weight on own class"] = 100 * float(np.mean(same))
    for m in run.methods:
        h = run.embeddings(m).astype(np.float64)
        out[f"{m} k1"] = auroc(maha(h))
        out[f"{m} captions"] = auroc(maha(h, labels))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="a `cmg experiment` output folder (holds task_seed* run folders)")
    args = ap.parse_args(argv)
    runs = sorted(p for p in Path(args.experiment).glob("task_seed*") if not p.name.endswith(("_soft", "_hard")))
    if not runs:
        print(f"no task_seed* runs in {args.experiment}", file=sys.stderr)
        return 2
    table = {}
    for p in runs:
        table[p.name] = task_diagnostics(Run.open(p))
        print(p.name, {k: round(v, 2) for k, v in table[p.name].items()}, flush=True)
    keys = list(next(iter(table.values())))
    print("\n| diagnostic | mean over tasks |\n|---|---|")
    for k in keys:
        print(f"| {k} | {np.mean([t[k] for t in table.values()]):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
