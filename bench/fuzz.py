"""Fuzz every input the tool reads from users with Hypothesis (tests/fuzz_targets.py) and report the counts.

    .venv/bin/python bench/fuzz.py                       # 10,000 cases over the seven targets, seed 0
    .venv/bin/python bench/fuzz.py --cases 2000 --seed 7 --json /tmp/fuzz.json

A case passes when the tool accepts the input (with a sane result) or refuses it with a project error and a
message; a traceback, a crash or a case slower than 30 s fails it (Hypothesis shrinks it to a small example,
printed here). Prints one line per target: cases, accepted, refused, failed, slowest case, wall time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzz_targets import TARGETS, run_target  # noqa: E402

SHARE = {"image": 0.25, "captions_csv": 0.15, "captions_jsonl": 0.15, "karpathy_json": 0.1, "imagefolder": 0.15,
         "config": 0.15, "run_folder": 0.05}  # of --cases; run folders are slow (each loads a Predictor)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000, help="total generated cases, shared over the targets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--json", default=None, help="also write the counts to this file")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # loaders warn about odd options; the count is what matters here
    total = sum(SHARE[t] for t in args.targets)
    rows, failed = [], 0
    print(f"fuzz: {args.cases} cases, seed {args.seed}, {cpu_name()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cmg_fuzz_") as base:
        for name in args.targets:
            target = TARGETS[name]
            cases = max(int(round(args.cases * SHARE[name] / total)), 1)
            t0 = time.perf_counter()
            error = None
            try:
                run_target(target, cases, args.seed, Path(base))
            except Exception as exc:  # noqa: BLE001 - a failing case: reported, the other targets still run
                error = "".join(traceback.format_exception(exc))[-6000:]
                failed += 1
            row = {"target": name, "what": target.what, "cases": sum(target.stats.values()) + (error is not None),
                   "accepted": target.stats["accepted"], "refused": target.stats["refused"],
                   "failed": int(error is not None), "slowest_s": round(target.slowest, 3),
                   "wall_s": round(time.perf_counter() - t0, 1), "error": error,
                   "top_refusals": target.reasons.most_common(5)}
            rows.append(row)
            print(f"{name:15s} cases {row['cases']:6d}  accepted {row['accepted']:6d}  refused {row['refused']:6d}  "
                  f"failed {row['failed']}  slowest {row['slowest_s']:.2f} s  wall {row['wall_s']:.0f} s", flush=True)
            if error:
                print(f"  FAILED:\n{error}", flush=True)
    print(f"total: {sum(r['cases'] for r in rows)} cases, {failed} target(s) with a failing case")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "cpu": cpu_name(), "targets": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
