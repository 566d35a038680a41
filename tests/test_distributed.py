"""Multi-process training (cmg_core.distributed + the end2end profile under torchrun, gloo backend on CPU)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cmg_core import distributed as D
from cmg_core.runs import RUN_FILES, Run

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.options={n_per_class: 10, classes: 4}", "data.image_size=32", "model.cifar_stem=false",
        "task.normal_classes=[circle, square]", "e1.epochs=1", "e1.batch_size=16", "cmer.rid_epochs=3",
        "cmle.n_clusters=2", "cmle.n_neighbors=3", "e2.epochs=2", "e2.batch_size=16",
        "train.methods=[ssd, cmg]", "train.device=cpu", "train.eval_every_epoch=false",
        "e1.encoder=end2end", "model.trunk_image_size=null",
        "model.backbone=cnn", "model.width=8"]  # a small CNN (BatchNorm, as ResNet-18) keeps 2 CPU ranks quick


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CMG_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_distributed()
    assert info.world_size == 1 and not info.distributed and D.is_main() and D.get_world_size() == 1
    x = torch.randn(3, 2)
    g, off = D.all_gather_rows(x, keep_grad=True)
    assert g is x and off == 0
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(5) == [5]
    D.barrier()
    D.cleanup(info)


GRAD_CHECK = textwrap.dedent('''
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from cmg_core import distributed as D
    from cmg_core.losses import nt_xent_loss


    def gathered_gradient(path):
        """The gradient of a linear model under NT-Xent on a batch of 8 rows, saved to `path` by the main process:
        in one process over the whole batch; under torchrun each rank holds 4 rows and the loss is over the
        gathered batch, scaled by world_size (as train/end2end.py)."""
        info = D.init_distributed()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = torch.nn.Linear(6, 4)
            x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
        if info.world_size == 1:
            nt_xent_loss(model(x1), model(x2), 0.5).backward()
        else:
            ddp = DDP(model)
            rows = slice(4 * info.rank, 4 * info.rank + 4)
            z1, z2 = ddp(torch.cat([x1[rows], x2[rows]])).split(4)
            g1, _ = D.all_gather_rows(z1, keep_grad=True)
            g2, _ = D.all_gather_rows(z2, keep_grad=True)
            (nt_xent_loss(g1, g2, 0.5) * info.world_size).backward()
            del ddp
        if D.is_main():
            torch.save(model.weight.grad, path)
        D.cleanup(info)
''')

RUN_SCRIPT = GRAD_CHECK + textwrap.dedent("""
    import json, os, sys
    from cmg_core.config import load_config
    from cmg_core.train import train_run

    # one torchrun launch for both checks (every interpreter start costs seconds), in one process group that both
    # join (init_distributed returns the existing group; a group destroyed and created again can hang)
    group = D.init_distributed()
    gathered_gradient(sys.argv[2])
    cfg = load_config("configs/synthetic_end2end.yaml", json.loads(sys.argv[1]))
    out = train_run(cfg)
    print(f"rank {os.environ['RANK']} finished {out}", flush=True)
    D.cleanup(group)
""")


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "train.py"
    script.write_text(RUN_SCRIPT)
    overrides = [f"out_dir={tmp / 'runs'}", "name=ddp", *TINY]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), json.dumps(overrides), str(tmp / "ddp_grad.pt")], env=_env(tmp), cwd=REPO,
                          capture_output=True, text=True, timeout=170)
    return proc, tmp / "runs" / "ddp"


def test_gathered_contrastive_loss_gives_the_full_batch_gradient(torchrun_run, tmp_path, monkeypatch):
    """Two ranks, each with half of the batch, give the gradient of the whole batch in one process (the
    reference, the same function run here)."""
    proc, run_dir = torchrun_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    scope = {}
    exec(GRAD_CHECK, scope)
    scope["gathered_gradient"](tmp_path / "ref.pt")
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(run_dir.parents[1] / "ddp_grad.pt")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_torchrun_trains_and_only_rank0_writes(torchrun_run):
    proc, run_dir = torchrun_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 finished" in proc.stdout and "rank 1 finished" in proc.stdout
    run = Run.open(run_dir)
    assert run.status == "done" and run.info["world_size"] == 2
    for f in RUN_FILES:
        assert (run_dir / f).is_file(), f
    for m in run.methods:
        assert run.embeddings(m).shape[0] == len(run.images())
    log = (run_dir / "log.txt").read_text()
    assert log.count(" task: ") == 1 and log.count(" done in ") == 1  # one writer
    hist = run.history()
    keys = list(zip(hist.stage, hist.method.fillna(""), hist.epoch))
    assert len(keys) == len(set(keys))
    assert sorted(hist[hist.stage == "e2"].groupby("method").epoch.max().tolist()) == [2, 2]
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == sorted(
        ["checkpoints", "embeddings", "models", "log.txt", "progress.json", *RUN_FILES])


def test_ranks_get_disjoint_shards(torchrun_run):
    proc, run_dir = torchrun_run
    assert proc.returncode == 0
    log = (run_dir / "log.txt").read_text()
    n_train = int((Run.open(run_dir).images().role == "train").sum())
    found = re.findall(r"shards (e1|e2 \S+) epoch 1: (\{.*\})", log)
    assert {s for s, _ in found} == {"e1", "e2 ssd", "e2 cmg"}
    for _, blob in found:
        shards = json.loads(blob)
        a, b = set(shards["0"]), set(shards["1"])
        assert len(a) == len(b) == n_train // 2 and not a & b and a | b == set(range(n_train))
