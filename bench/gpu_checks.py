"""Checks of the end-to-end path on a GPU, in well under a minute (the first step of `bench/gpu_paper.sh`).

    python bench/gpu_checks.py --packed PACK.npz [--device cuda] [--out DIR]

Plain Python (the GPU machine need not have pytest; `tests/test_gpu.py` runs the same checks under pytest where
CUDA is present). PACK is a packed file with caption embeddings and trunk features for
`configs/ucm_captions_paper.yaml` (see `bench/gpu_paper.py`). Prints one line per check and exits 1 if one failed.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["task.n_normal=2", "cmle.n_clusters=2", "cmle.n_neighbors=3", "e1.epochs=2", "cmer.rid_epochs=3",
        "e2.epochs=2", "e2.batch_size=32", "train.eval_every_epoch=true"]


def check_device(device: str) -> str:
    import torch

    if device == "cuda":
        assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
        x = torch.randn(64, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = x @ x
        assert y.dtype == torch.bfloat16
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{device}, torch {torch.__version__}"


def check_augment(device: str) -> str:
    """The batched augmentation gives the same views on the device as on the CPU (same generator draws)."""
    import torch

    from cmg_core.train.nets import batch_simclr_augment

    x = torch.rand(16, 3, 32, 32)
    a = batch_simclr_augment(x, torch.Generator().manual_seed(0), crop_scale=(0.2, 1.0))
    b = batch_simclr_augment(x.to(device), torch.Generator().manual_seed(0), crop_scale=(0.2, 1.0)).cpu()
    err = (a - b).abs().max().item()
    assert err < 1e-3, f"device views differ from CPU views by {err}"
    return f"max |cpu - {device}| = {err:.2e}"


def _train(packed: str, out: Path, name: str, device: str, extra: list[str]):
    from cmg_core.config import load_config
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    cfg = load_config(REPO / "configs" / "ucm_captions_paper.yaml",
                      ["data.name=packed", f"data.root={packed}", f"out_dir={out}", f"name={name}",
                       f"train.device={device}", *TINY, *extra])
    return Run.open(train_run(cfg, overwrite=True))


def check_run(packed: str, out: Path, device: str, extra: list[str]) -> str:
    """Every method of the paper config trains on the device and scores finite values."""
    import numpy as np

    from cmg_core.methods import parse_method, scored_key

    run = _train(packed, out, "frozen_e1", device, extra)
    assert run.status == "done", run.info.get("error")
    assert run.info["device"].startswith(device), run.info["device"]
    metrics = run.metrics()
    scorers = run.config().detector.scorers  # each method's Mahalanobis and k-NN scores, or its own rule (bliss, she)
    keys = {scored_key(m, s) for m in run.methods for s in parse_method(m).scorers(scorers)}
    assert set(metrics) == keys, (sorted(metrics), run.methods)
    for m in keys:
        assert np.isfinite(run.scores()[f"score_{m}"].values).all(), m
    return " ".join(f"{m}={v['auroc']:.1f}" for m, v in metrics.items())


def check_end2end_e1_and_predictor(packed: str, out: Path, device: str, extra: list[str]) -> str:
    """E1 trained end to end (pixel masks) under autocast, and the Predictor scoring images on the device."""
    import numpy as np
    from PIL import Image

    from cmg_core.data import load_dataset
    from cmg_core.predict import Predictor

    run = _train(packed, out, "e2e_e1", device, ["e1.encoder=end2end", "model.trunk_image_size=null", *extra,
                                                  "train.methods=[ssd+er, cmg[lle]]"])  # the methods it checks
    assert run.status == "done", run.info.get("error")
    pred = Predictor.load(run.path, device=device)
    ds = load_dataset("packed", packed)
    idx = run.images()["index"].values[:4]
    pils = [Image.fromarray(a) for a in ds.image_array(idx, ds.packed_size)]
    res = pred.explain_many(pils)
    got = np.array([r["scores"]["ssd+er"] for r in res])
    stored = run.scores()["score_ssd+er"].values[:4]
    assert np.allclose(got, stored, rtol=2e-2, atol=1e-2), (got, stored)  # scored features are fp32 on both sides
    return f"predictor reproduces the run's scores ({np.abs(got - stored).max():.2e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp/cmg_gpu_checks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    failed = 0
    checks = [("device", lambda: check_device(args.device)), ("augment", lambda: check_augment(args.device)),
              ("run", lambda: check_run(args.packed, out, args.device, args.set)),
              ("end2end E1 + predictor", lambda: check_end2end_e1_and_predictor(args.packed, out, args.device,
                                                                                  args.set))]
    for name, fn in checks:
        t = time.time()
        try:
            msg = fn()
            print(f"PASS {name} ({time.time() - t:.1f} s): {msg}", flush=True)
        except Exception:  # report every check, then fail
            failed += 1
            print(f"FAIL {name} ({time.time() - t:.1f} s):\n{traceback.format_exc()}", flush=True)
    print(f"{len(checks) - failed} passed, {failed} failed in {time.time() - t0:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
