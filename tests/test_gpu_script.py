"""The GPU script (`bench/gpu_paper.sh`: checks, then the time-boxed 5-task protocol) in its CPU smoke mode, on a
tiny packed synthetic file that carries caption embeddings and trunk features, as the GPU machine needs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cmg_core.cli import main as cmg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_pack")
    out = tmp / "tiny.npz"
    assert cmg(["data", "pack", "synthetic", "-o", "n_per_class=8", "-o", "classes=4", "--size", "32",
                "--out", str(out), "--trunk-config", "configs/ucm_captions_paper.yaml", "--device", "cpu"]) == 0
    return out


def test_pack_carries_what_the_gpu_run_needs(tiny_pack):
    from cmg_core.config import load_config, mask_apply
    from cmg_core.data import load_dataset
    from cmg_core.features import stored_trunk_features, trunk_feature_spec

    ds = load_dataset("packed", tiny_pack)
    cfg = load_config("configs/ucm_captions_paper.yaml")
    spec = trunk_feature_spec(cfg.model.trunk, 32, cfg.model.trunk_image_size, 4, "hard", cfg.cmer.soft_value,
                              mask_apply(cfg))
    orig, masked = stored_trunk_features(ds, spec)
    assert orig.shape == (len(ds), 1280) and masked.shape == (len(ds), 4, 1280)
    assert ds.caption_embeddings_for([0, 1], cfg.model.text_model).shape[-1] == 384


def test_gpu_script_smoke(tiny_pack, tmp_path):
    out = tmp_path / "gpu_out"
    env = dict(os.environ, CMG_CACHE_DIR=str(tmp_path / "cache"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_paper.sh", str(out), str(tiny_pack), "--smoke", "--seeds", "0", "1",
                           "--backbones", "cnn", "--budget-s", "240", "--parallel", "2", "--threads", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = (out / "checks.log").read_text()
    assert "4 passed, 0 failed" in checks, checks[-3000:]
    per_task = pd.read_csv(out / "results.csv")
    assert set(per_task.seed) == {0, 1} and set(per_task.backbone) == {"cnn"}
    assert {"raw", "ssd", "cmda", "she", "bliss", "ssd+le[lle]", "ssd+le[supcon]", "cmg[lle]", "cmg[supcon]",
            "cmg-mse"} <= set(per_task.method)
    md = (out / "results.md").read_text()
    assert "## cnn" in md and "cmg[supcon]" in md and "Machine:" in md
    import tarfile

    with tarfile.open(out / "runs_slim.tgz") as tar:  # what comes back from a lent machine: no models
        names = tar.getnames()
    assert "runs/cnn_seed0/metrics.json" in names and not any("/models" in n or n.endswith(".pt") for n in names)


def test_text_cache_spares_the_gpu_machine_the_text_model(tiny_pack, tmp_path, monkeypatch):
    """bench/gpu_text_cache.py embeds BLISS's prompts of every class and its dictionary here; with CMG_CACHE_DIR
    at that folder the text encoder answers them without loading its model (the GPU machine has none)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_text_cache import main as text_cache, texts_for

    from cmg_core.encoders import TextEncoder

    assert text_cache(["--packed", str(tiny_pack), "--out", str(tmp_path / "tc")]) == 0
    model, texts = texts_for(tiny_pack, REPO / "configs" / "ucm_captions_paper.yaml")
    assert texts[0].startswith("This is a photo of a") and len(texts) == 4 + 999
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "tc"))
    enc = TextEncoder(model, device="cpu")
    assert enc.encode(texts).shape == (len(texts), 384) and enc._model is None  # every text from the cache


def gpu_paper(argv: list[str]) -> int:
    """bench/gpu_paper.py's driver, run in this process (its task processes are still processes of their own)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_paper import main

    return main(argv)


def test_gpu_script_stops_at_its_budget(tiny_pack, tmp_path, monkeypatch):
    """With no time left nothing starts: the driver still writes its (empty) tables and says so."""
    out = tmp_path / "late"
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    assert gpu_paper(["--packed", str(tiny_pack), "--out", str(out), "--smoke", "--budget-s", "0", "--seeds", "0",
                      "--backbones", "cnn"]) == 1
    assert "No method finished" in (out / "results.md").read_text()
    assert "cnn: not started" in (out / "driver.log").read_text()


def test_a_run_past_its_deadline_starts_no_method(tiny_pack, tmp_path, monkeypatch):
    """CMG_DEADLINE: a run that reaches its methods after the deadline trains none and is marked partial; run
    again without the deadline, it trains them (E1 and RID are reused)."""
    from cmg_core.config import load_config
    from cmg_core.runs import Run
    from cmg_core.train import train_run

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_paper import SMOKE

    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CMG_DEADLINE", "0")
    cfg = load_config("configs/ucm_captions_paper.yaml", ["data.name=packed", f"data.root={tiny_pack}",
                                                          f"out_dir={tmp_path}", "name=late", "train.device=cpu",
                                                          "train.methods=[ssd, cmg[supcon]]", *SMOKE])
    run = Run.open(train_run(cfg))
    assert run.status == "partial" and run.info["skipped_methods"] == ["ssd", "cmg[supcon]"]
    assert "time budget (CMG_DEADLINE) reached" in run.log_tail(50) and run.metrics() == {}
    monkeypatch.delenv("CMG_DEADLINE")
    run = Run.open(train_run(cfg))
    assert run.status == "done" and set(run.metrics()) == {"ssd", "cmg[supcon]", "ssd@knn", "cmg[supcon]@knn"}


def test_gpu_script_audit_in_two_stages(tiny_pack, tmp_path, monkeypatch):
    """--audit: one `cmg audit` process per task, the scoring-only departures first, then the retraining ones on
    the tasks that finished (reusing their honest runs); after each stage the tables are merged in-process."""
    out = tmp_path / "audit"
    monkeypatch.setenv("CMG_CACHE_DIR", str(tmp_path / "cache"))
    assert gpu_paper(["--packed", str(tiny_pack), "--out", str(out), "--smoke", "--audit", "--departures",
                      "best_epoch", "supcon_batch", "--seeds", "0", "1", "--backbones", "cnn", "--budget-s", "240",
                      "--min-left-s", "0", "--parallel", "2", "--threads", "1"]) == 0, (out / "driver.log").read_text()
    per_task = pd.read_csv(out / "results.csv")
    assert set(per_task.departures) == {"best_epoch", "best_epoch supcon_batch"} and set(per_task.seed) == {0, 1}
    stage2 = per_task[per_task.departures == "best_epoch supcon_batch"]
    assert {"honest protocol", "best_epoch", "supcon_batch"} <= set(stage2.row)
    assert set(stage2.method) == {"ssd", "ssd+er", "ssd+le[lle]", "ssd+le[supcon]", "cmg[lle]", "cmg[supcon]", "cmda"}
    honest = per_task[per_task.row == "honest protocol"].set_index(["departures", "seed", "method"]).reported
    assert (honest["best_epoch"] == honest["best_epoch supcon_batch"]).all()  # the same runs, reused
    assert "finished earlier, reused" in (out / "logs" / "cnn_audit2_seed0.log").read_text()
    md = (out / "results.md").read_text()
    assert "## cnn: best_epoch supcon_batch" in md and "### Reported AUROC" in md and "Machine:" in md
