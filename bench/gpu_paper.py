"""The paper's regime on one GPU, time-boxed: the 5-task UCM protocol with encoders trained from scratch.

    python bench/gpu_paper.py --packed PACK.npz --out OUTDIR [--budget-s 400] [--backbones resnet18 resnet50]

Needs only the packed file (`cmg data pack ucm_captions --size 32 --trunk-config configs/ucm_captions_paper.yaml`:
images, caption embeddings and the frozen trunk's features, so neither the text model nor the trunk's weights are
needed) and torch, torchvision, timm, scikit-learn, scipy, pandas, pyyaml. Each backbone runs the config's
every method (both CMLE readings) on task seeds 0-4; the tasks of a backbone run as parallel processes on the
one GPU (a 32 px ResNet leaves most of it idle). Every process gets the deadline (CMG_DEADLINE): it starts no
method after it and writes each finished method's metrics at once, and the driver stops what still runs a little
after it, so the tables always hold what finished. Writes OUTDIR/results.csv (per task and method),
OUTDIR/results.md (mean +- 95 % CI per backbone and method, with the number of tasks), OUTDIR/logs/*.log and the
run folders in OUTDIR/runs/.

`--smoke` runs the same code on CPU in seconds (tiny epochs, 2 tasks; `tests/test_gpu_script.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOKE = ["e2.epochs=1", "e1.epochs=2", "cmer.rid_epochs=2", "e2.batch_size=16", "model.width=4", "model.backbone=cnn",
         "task.n_normal=2", "cmle.n_clusters=2", "cmle.n_neighbors=3"]


def task_command(args, backbone: str, seed: int, out: Path) -> list[str]:
    sets = ["data.name=packed", f"data.root={args.packed}", f"model.backbone={backbone}", f"task.seed={seed}",
            f"name={backbone}_seed{seed}", f"out_dir={out / 'runs'}", f"train.device={args.device}"]
    if args.smoke:
        sets += SMOKE
    sets += args.set
    cmd = [sys.executable, "-m", "cmg_core.cli", "train", "--config", str(args.config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_backbone(args, backbone: str, out: Path, deadline: float, log) -> None:
    env = dict(os.environ, CMG_DEADLINE=str(deadline), PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = []
    for seed in args.seeds:
        logf = open(out / "logs" / f"{backbone}_seed{seed}.log", "w")
        procs.append((seed, subprocess.Popen(task_command(args, backbone, seed, out), cwd=REPO, env=env,
                                             stdout=logf, stderr=subprocess.STDOUT, start_new_session=True), logf))
        while sum(p.poll() is None for _, p, _ in procs) >= args.parallel:
            time.sleep(0.5)
    hard = deadline + args.grace_s
    while any(p.poll() is None for _, p, _ in procs) and time.time() < hard:
        time.sleep(0.5)
    for seed, p, logf in procs:
        if p.poll() is None:
            log(f"{backbone} seed {seed}: still running at the deadline + {args.grace_s:.0f} s; stopped")
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        logf.close()
        log(f"{backbone} seed {seed}: exit code {p.returncode}")


def collect(out: Path):
    import pandas as pd

    from cmg_core.experiment import metric_rows
    from cmg_core.runs import read_json

    rows = []
    for run_dir in sorted((out / "runs").glob("*_seed*")):
        metrics = run_dir / "metrics.json"
        if not metrics.is_file():
            continue
        backbone, seed = run_dir.name.rsplit("_seed", 1)
        info = read_json(run_dir / "run.json")
        rows += [{"backbone": backbone, "seed": int(seed), "status": info.get("status"), **r}
                 for r in metric_rows(read_json(metrics))]
    return pd.DataFrame(rows)


def write_results(out: Path, per_task, wall: float, device_line: str) -> str:
    from cmg_core.experiment import markdown_table, summarize

    per_task.to_csv(out / "results.csv", index=False)
    parts = [f"# The paper's regime on one GPU (`bench/gpu_paper.py`)\n\n{device_line}\n\nWall time: {wall:.0f} s. "
             "Mean ± 95% CI (t distribution) over the tasks that finished (column `tasks`); final-epoch models.\n"]
    for backbone, g in (per_task.groupby("backbone", sort=False) if len(per_task) else []):
        parts.append(f"\n## {backbone}\n\n{markdown_table(summarize(g))}\n")
    if per_task.empty:
        parts.append("\nNo method finished.\n")
    text = "".join(parts)
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", required=True, help="packed UCM file with caption embeddings and trunk features")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO / "configs" / "ucm_captions_paper.yaml"))
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget-s", type=float, default=400.0, help="no method starts after this many seconds")
    ap.add_argument("--grace-s", type=float, default=25.0, help="then running methods get this long to finish")
    ap.add_argument("--min-left-s", type=float, default=90.0, help="a backbone starts only with this much time left")
    ap.add_argument("--parallel", type=int, default=5, help="tasks trained at the same time")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per task process")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--smoke", action="store_true", help="tiny settings on CPU, for CI")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget_s
    lines = []

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        lines.append(line)
        (out / "driver.log").write_text("\n".join(lines) + "\n")

    from cmg_core.utils import machine_description

    device_line = f"Machine: {machine_description(args.device)}"
    log(device_line)
    for backbone in args.backbones:
        left = deadline - time.time()
        if left < args.min_left_s:
            log(f"{backbone}: not started, {left:.0f} s left (< {args.min_left_s:.0f} s)")
            continue
        log(f"{backbone}: {len(args.seeds)} tasks, {args.parallel} at a time, {left:.0f} s left")
        run_backbone(args, backbone, out, deadline, log)
        per_task = collect(out)
        write_results(out, per_task, time.time() - t0, device_line)  # after each backbone: nothing is lost
    per_task = collect(out)
    text = write_results(out, per_task, time.time() - t0, device_line)
    log(f"results in {out / 'results.md'}")
    print(text)
    (out / "summary.json").write_text(json.dumps({"wall_s": time.time() - t0, "rows": len(per_task)}))
    return 0 if len(per_task) else 1


if __name__ == "__main__":
    sys.exit(main())
