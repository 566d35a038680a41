"""Fault injection: `cmg train` killed with SIGKILL at random points, then resumed; the resumed run must finish
with the metrics of an uninterrupted run, and no file of the run folder may ever be half written.

    .venv/bin/python bench/faults.py                         # 12 kills per profile (frozen, end2end), seed 0
    .venv/bin/python bench/faults.py --kills 4 --profiles frozen --json /tmp/faults.json

Per profile: one uninterrupted reference run (its atomic writes are recorded in order), then `--kills` trials, a
third each of
  * `time`        SIGKILL from outside after a random delay (mid-epoch, mid-evaluation, anywhere);
  * `checkpoint`  inside a random per-epoch checkpoint write (`checkpoints/*.pt`): the temporary file is cut to
                  half its size, then the process kills itself before the rename;
  * `final`       the same inside a random write of the run's results (models/, embeddings/, tables, metrics).
After each kill every file a reader opens (JSON, JSONL, CSV, YAML, .npz, .npy, .pt) is parsed; then the same
command runs again without faults and its metrics.json and scores.csv are compared with the reference run's.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROFILES = {
    "frozen": ("configs/synthetic.yaml",
               ["data.options={n_per_class: 30, classes: 4}", "task.normal_classes=[circle, square]",
                "e1.epochs=6", "cmer.rid_epochs=6", "e2.epochs=3", "e2.n_views=2", "model.head_hidden=64",
                "train.methods=[ssd, ssd+er, cmg]"]),
    "end2end": ("configs/synthetic_end2end.yaml",
                ["data.options={n_per_class: 10, classes: 4}", "data.image_size=32", "model.cifar_stem=false",
                 "e1.epochs=2", "cmer.rid_epochs=4", "cmle.n_clusters=2", "e2.epochs=2",
                 "train.methods=[ssd, cmg]", "train.device=cpu"]),
}
POINTS = ("time", "checkpoint", "final")
TOLERANCE = 1e-6  # metrics of a resumed run against the reference (float reductions may differ in the last bits)


# --- the child: `cmg train` with a write hook -----------------------------------------------------------------

def child(events: Path, kill_at: int, argv: list[str]) -> int:
    """Run `cmg train argv`, recording every atomic rename's target in `events`; at the `kill_at`-th rename
    (1-based; 0: never) cut the temporary file to half and SIGKILL this process before the rename happens."""
    from cmg_core.cli import main

    real = os.replace
    count = [0]

    def replace(src, dst, *a, **k):
        count[0] += 1
        with open(events, "a") as fh:
            fh.write(f"{dst}\n")
        if count[0] == kill_at:
            size = os.path.getsize(src)
            with open(src, "r+b") as fh:
                fh.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)

    os.replace = replace
    return main(argv)


def train_cmd(config: str, overrides: list[str], out: Path, name: str) -> list[str]:
    sets = [f"out_dir={out}", f"name={name}", *overrides]
    return ["train", "--config", config, *[a for kv in sets for a in ("--set", kv)]]


def launch(argv: list[str], events: Path, kill_at: int = 0, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "child", str(events), str(kill_at), "--", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)


# --- checks ---------------------------------------------------------------------------------------------------

def unreadable_files(run_dir: Path) -> list[str]:
    """Files of the run folder a reader would open that do not parse (temporary `.x.tmp` files are skipped:
    no reader opens them)."""
    import numpy as np
    import pandas as pd
    import torch
    import yaml

    bad = []
    for p in sorted(run_dir.rglob("*")):
        if not p.is_file() or (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            elif p.suffix == ".csv":
                pd.read_csv(p)
            elif p.suffix == ".yaml":
                yaml.safe_load(p.read_text())
            elif p.suffix == ".npz":
                with np.load(p) as z:
                    [z[k] for k in z.files]
            elif p.suffix == ".npy":
                np.load(p)
            elif p.suffix == ".pt":
                torch.load(p, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to parse is a half-written file
            bad.append(f"{p.relative_to(run_dir)} ({type(exc).__name__}: {exc})"[:200])
    return bad


def results_of(run_dir: Path) -> tuple[dict, "np.ndarray"]:
    import pandas as pd

    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = pd.read_csv(run_dir / "scores.csv")
    return metrics, scores[[c for c in scores.columns if c.startswith("score_")]].to_numpy(float)


def largest_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over the numbers of two metrics.json dicts (inf when their keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k in a:
        if isinstance(a[k], dict):
            worst = max(worst, largest_difference(a[k], b[k]) if isinstance(b[k], dict) else float("inf"))
        elif isinstance(a[k], (int, float)) and not isinstance(a[k], bool):
            worst = max(worst, abs(float(a[k]) - float(b[k])))
    return worst


# --- one profile ----------------------------------------------------------------------------------------------

def kind_of(target: str) -> str:
    name = Path(target).name
    if "/checkpoints/" in target:
        return "checkpoint"
    if name in ("progress.json", "run.json", "config.yaml", "launch.json"):
        return "bookkeeping"
    return "final"


def profile_trials(profile: str, kills: int, rng: random.Random, work: Path, log) -> list[dict]:
    import numpy as np

    config, overrides = PROFILES[profile]
    env = {**os.environ, "CMG_CACHE_DIR": str(work / "cache")}
    runs = {}
    for name in ("warmup", "reference"):  # the first fills the feature cache; both must agree to the bit
        t0 = time.perf_counter()
        p = launch(train_cmd(config, overrides, work, f"{profile}_{name}"), work / f"{profile}_{name}.events", env=env)
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name} run of {profile} failed:\n{err.decode()[-3000:]}")
        runs[name] = time.perf_counter() - t0
    ref_seconds = runs["reference"]
    ref_events = work / f"{profile}_reference.events"
    repeat = largest_difference(results_of(work / f"{profile}_warmup")[0], results_of(work / f"{profile}_reference")[0])
    ref_metrics, ref_scores = results_of(work / f"{profile}_reference")
    events = ref_events.read_text().splitlines()
    by_kind = {k: [i + 1 for i, e in enumerate(events) if kind_of(e) == k] for k in ("checkpoint", "final")}
    log(f"{profile}: reference run {ref_seconds:.1f} s (first run {runs['warmup']:.1f} s; metrics differ by {repeat}), "
        f"{len(events)} atomic writes "
        f"({len(by_kind['checkpoint'])} checkpoint, {len(by_kind['final'])} results)")
    rows = []
    for i in range(kills):
        point = POINTS[i % len(POINTS)]
        name = f"{profile}_kill{i:02d}"
        argv = train_cmd(config, overrides, work, name)
        ev = work / f"{name}.events"
        kill_at, delay = 0, None
        if point == "time":
            delay = rng.uniform(0.05, 0.8) * ref_seconds  # a resumed run is quicker than its reference
        else:
            kill_at = rng.choice(by_kind[point])
        p = launch(argv, ev, kill_at, env=env)
        if delay is not None:
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
        p.communicate()
        killed = p.returncode == -signal.SIGKILL
        where = (ev.read_text().splitlines()[-1] if ev.is_file() and ev.read_text() else "(before any write)")
        bad = unreadable_files(work / name) if (work / name).is_dir() else []
        r = launch(argv, work / f"{name}.resume.events", env=env)
        _, err = r.communicate()
        row = {"profile": profile, "trial": i, "point": point, "killed": killed, "kill_at_write": kill_at,
               "reference_s": round(ref_seconds, 1), "reference_repeat_diff": repeat,
               "delay_s": round(delay, 2) if delay else None,
               "last_write": str(Path(where).relative_to(work / name)) if where.startswith(str(work / name)) else where,
               "unreadable_after_kill": bad, "resumed_ok": r.returncode == 0}
        if r.returncode == 0:
            metrics, scores = results_of(work / name)
            row["metrics_diff"] = largest_difference(ref_metrics, metrics)
            row["scores_diff"] = float(np.abs(scores - ref_scores).max()) if scores.shape == ref_scores.shape else None
            row["left_temporary_files"] = [str(q.relative_to(work / name)) for q in (work / name).rglob(".*.tmp")]
        else:
            row["error"] = err.decode()[-1500:]
        row["ok"] = bool(killed and not bad and row["resumed_ok"] and row.get("metrics_diff", 1) <= TOLERANCE)
        rows.append(row)
        log(f"  {name}: {point:10s} killed={killed} at {row['last_write']!s:40.40s} unreadable={len(bad)} "
            f"resumed={row['resumed_ok']} metrics diff={row.get('metrics_diff')} scores diff={row.get('scores_diff')}")
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sep = sys.argv.index("--")
        return child(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="trials per profile (a third of each kind)")
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from bench.fuzz import cpu_name

    rng = random.Random(args.seed)
    print(f"faults: {args.kills} kills per profile, seed {args.seed}, {cpu_name()}", flush=True)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmg_faults_") as work:
        for profile in args.profiles:
            rows += profile_trials(profile, args.kills, rng, Path(work), lambda m: print(m, flush=True))
    ok = sum(r["ok"] for r in rows)
    print(f"total: {len(rows)} kills, {sum(r['killed'] for r in rows)} killed, "
          f"{sum(bool(r['unreadable_after_kill']) for r in rows)} left a half-written file, "
          f"{sum(r['resumed_ok'] for r in rows)} resumed, {ok} finished with the reference metrics "
          f"(|diff| <= {TOLERANCE}); {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "cpu": cpu_name(), "tolerance": TOLERANCE,
                                               "trials": rows}, indent=1))
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
