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

`--audit` runs `cmg audit` instead (the released protocol, departure by departure: cmg_core.audit) on the same
tasks, one process per task, in two stages: first the departures that only change scoring (the honest run records
every scoring they need), then, with the time left, the ones that retrain (their runs reuse the honest run's E1
and RID). After each stage the finished tasks' tables are merged (nothing is trained then) into
OUTDIR/audit/<backbone>_audit/ and OUTDIR/results.md|csv, so a stage cut by the budget still leaves the one
before it. `--departures` picks them; by default all but `caption_items` (it retrains every method on five
times the items: a device session of its own, `--departures caption_items`).

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

AUDIT_DEPARTURES = ["best_epoch", "rid_on_test", "test_captions", "bn_train", "supcon_batch", "released_epochs",
                    "anomalies_unmasked"]
SMOKE = ["e2.epochs=1", "e1.epochs=2", "cmer.rid_epochs=2", "e2.batch_size=16", "model.width=4", "model.backbone=cnn",
         "task.n_normal=2", "cmle.n_clusters=2", "cmle.n_neighbors=3"]


def common_sets(args, backbone: str) -> list[str]:
    return ["data.name=packed", f"data.root={args.packed}", f"model.backbone={backbone}",
            f"train.device={args.device}", *(SMOKE if args.smoke else []), *args.set]


def audit_sets(args, backbone: str, out: Path, seeds) -> list[str]:
    """The overrides of a backbone's audit (folder OUTDIR/audit/<backbone>_audit) on task seeds `seeds`."""
    return [*common_sets(args, backbone), f"name={backbone}", f"experiment.out_dir={out / 'audit'}",
            f"train.eval_every={args.eval_every}", f"experiment.task_seeds=[{', '.join(map(str, seeds))}]"]


def task_command(args, backbone: str, seed: int, out: Path, departures=None) -> list[str]:
    """One task's process: `cmg train` of the config's methods, or (`departures`) `cmg audit` of that task."""
    if departures is None:
        cmd, sets = ["train"], [*common_sets(args, backbone), f"task.seed={seed}", f"name={backbone}_seed{seed}",
                                f"out_dir={out / 'runs'}"]
    else:
        cmd, sets = ["audit", "--departures", *departures], audit_sets(args, backbone, out, [seed])
    cmd = [sys.executable, "-m", "cmg_core.cli", *cmd, "--config", str(args.config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_backbone(args, backbone: str, out: Path, deadline: float, log, seeds=None, departures=None,
                 tag: str = "") -> dict:
    """Train a backbone's tasks as parallel processes until the deadline; returns {seed: exit code}."""
    env = dict(os.environ, CMG_DEADLINE=str(deadline), PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = []
    for seed in args.seeds if seeds is None else seeds:
        logf = open(out / "logs" / f"{backbone}{tag}_seed{seed}.log", "w")
        procs.append((seed, subprocess.Popen(task_command(args, backbone, seed, out, departures), cwd=REPO, env=env,
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
        log(f"{backbone}{tag} seed {seed}: exit code {p.returncode}")
    return {seed: p.returncode for seed, p, _ in procs}


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


def audit_stages(departures) -> list[list[str]]:
    """Stage 1: the departures that change only scoring (no retraining); stage 2: all, when some retrain."""
    from cmg_core.audit import BY_NAME

    unknown = [n for n in departures if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"--departures: unknown {unknown}; expected some of {list(BY_NAME)}")
    scoring = [n for n in departures if not BY_NAME[n].train]
    return [scoring, list(departures)] if scoring and len(scoring) < len(departures) else [list(departures)]


def merge_audit(args, backbone: str, out: Path, seeds, departures, log) -> dict | None:
    """The audit tables over the finished tasks `seeds`, in-process: every run is reused (CMG_DEADLINE in the past
    keeps anything from training). Returns {backbone, departures, md, per_task} or None."""
    import pandas as pd

    from cmg_core.audit import run_audit
    from cmg_core.config import load_config
    from cmg_core.errors import ConfigError

    cfg = load_config(args.config, audit_sets(args, backbone, out, seeds))
    old = os.environ.get("CMG_DEADLINE")
    os.environ["CMG_DEADLINE"] = "0"
    try:
        exp_dir = run_audit(cfg, departures, log=lambda _: None)
    except ConfigError as exc:
        log(f"{backbone}: the audit tables of seeds {seeds} could not be written: {exc}")
        return None
    finally:
        if old is None:
            del os.environ["CMG_DEADLINE"]
        else:
            os.environ["CMG_DEADLINE"] = old
    per_task = pd.read_csv(exp_dir / "audit.csv").assign(backbone=backbone, departures=" ".join(departures))
    return {"backbone": backbone, "departures": departures, "md": (exp_dir / "audit.md").read_text(),
            "per_task": per_task}


def audit_backbone(args, backbone: str, out: Path, deadline: float, log) -> list[dict]:
    """A backbone's audit in stages (audit_stages); each later stage runs on the tasks that finished the one
    before, when at least --min-left-s are left. Returns the merged tables of the stages that finished."""
    tables, seeds = [], list(args.seeds)
    for i, departures in enumerate(audit_stages(args.departures), start=1):
        left = deadline - time.time()
        if i > 1 and left < args.min_left_s:
            log(f"{backbone}: audit stage {i} ({' '.join(departures)}) not started, {left:.0f} s left")
            break
        log(f"{backbone}: audit stage {i}, departures {' '.join(departures)}, seeds {seeds}, {left:.0f} s left")
        codes = run_backbone(args, backbone, out, deadline, log, seeds, departures, tag=f"_audit{i}")
        seeds = [s for s, code in codes.items() if code == 0]
        if not seeds:
            log(f"{backbone}: no task finished audit stage {i}")
            break
        table = merge_audit(args, backbone, out, seeds, departures, log)
        if table is None:
            break
        tables.append(table)
    return tables


def write_audit_results(out: Path, tables: list[dict], wall: float, device_line: str) -> str:
    """results.csv (every stage's audit.csv with backbone and departures) and results.md (their audit.md)."""
    import pandas as pd

    if tables:
        pd.concat([t["per_task"] for t in tables]).to_csv(out / "results.csv", index=False)
    parts = [f"# The released protocol, departure by departure, on one GPU (`bench/gpu_paper.py --audit`)\n\n"
             f"{device_line}\n\nWall time: {wall:.0f} s. Each stage's tables are those of `cmg audit` on the tasks "
             "that finished it.\n"]
    for t in tables:
        body = "\n".join("##" + line if line.startswith("#") else line for line in t["md"].splitlines())
        parts.append(f"\n## {t['backbone']}: {' '.join(t['departures'])}\n\n{body}\n")
    if not tables:
        parts.append("\nNo audit task finished.\n")
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
    ap.add_argument("--audit", action="store_true", help="run `cmg audit` on the tasks instead (module docstring)")
    ap.add_argument("--departures", nargs="+", default=AUDIT_DEPARTURES, metavar="NAME",
                    help="the audit's departures (default: all but caption_items)")
    ap.add_argument("--eval-every", type=int, default=10, help="the audit's test AUROC every N epochs")
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
    tables = []

    def write() -> tuple[str, int]:
        if args.audit:
            return write_audit_results(out, tables, time.time() - t0, device_line), len(tables)
        per_task = collect(out)
        return write_results(out, per_task, time.time() - t0, device_line), len(per_task)

    for backbone in args.backbones:
        left = deadline - time.time()
        if left < args.min_left_s:
            log(f"{backbone}: not started, {left:.0f} s left (< {args.min_left_s:.0f} s)")
            continue
        log(f"{backbone}: {len(args.seeds)} tasks, {args.parallel} at a time, {left:.0f} s left")
        if args.audit:
            tables += audit_backbone(args, backbone, out, deadline, log)
        else:
            run_backbone(args, backbone, out, deadline, log)
        write()  # after each backbone: nothing is lost
    text, n = write()
    log(f"results in {out / 'results.md'}")
    print(text)
    (out / "summary.json").write_text(json.dumps({"wall_s": time.time() - t0, "rows": n}))
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
