"""Sweep one config key over values with the experiment protocol on development task seeds.

    .venv/bin/python bench/sweep.py --config configs/ucm_captions.yaml --key cmle.weight --values 0.3 1 3 10 \
        --seeds 100 101 102 103 104 --methods ssd ssd+le

Each value is one `cmg experiment` (no analyses, no Fig.9 mask runs) in `<out>/<name>_<key>=<value>/`, so a
rerun reuses finished tasks. Prints mean +- 95% CI AUROC per method and value. Choose settings with seeds
you will not report (the README's numbers use seeds 0-4 and 5-9; its development seeds are 100-104).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg_core.config import load_config  # noqa: E402
from cmg_core.experiment import run_experiment  # noqa: E402
from cmg_core.methods import parse_method, scored_key  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--key", required=True, help="dotted config key, e.g. cmle.weight")
    ap.add_argument("--values", nargs="+", required=True, help="values (parsed as YAML: 0.3, null, true, [1,2])")
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102, 103, 104])
    ap.add_argument("--methods", nargs="+", default=["ssd", "ssd+le"])
    ap.add_argument("--out", default="experiments/sweeps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more key=value overrides")
    args = ap.parse_args(argv)
    rows = []
    name = load_config(args.config, args.overrides).name
    for value in args.values:
        cfg = load_config(args.config, [*args.overrides, f"{args.key}={value}",
                                        f"name={name}_{args.key}={value}", f"experiment.out_dir={args.out}",
                                        f"experiment.task_seeds={list(args.seeds)}",
                                        f"train.methods=[{','.join(args.methods)}]", "experiment.mask_ablation=false"])
        exp_dir = run_experiment(cfg, analyses=False, log=lambda msg: print(msg, flush=True))
        summary = pd.read_csv(exp_dir / "summary.csv")  # methods named with their CMLE reading
        specs = [parse_method(m, cfg.cmle.loss) for m in args.methods]  # own rule (bliss, she) or detector.scorers
        labels = [scored_key(sp.label, s) for sp in specs for s in sp.scorers(cfg.detector.scorers)]
        for _, r in summary.iterrows():
            rows.append({args.key: value, "method": scored_key(r["method"], r.get("scorer", "mahalanobis")),
                         "auroc": f"{r['auroc']:.2f} ± {r['auroc_ci95']:.2f}"})
    print(f"\nAUROC, mean ± 95% CI over seeds {args.seeds}\n")
    print(f"| {args.key} | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for value in args.values:
        cells = {r["method"]: r["auroc"] for r in rows if r[args.key] == value}
        print(f"| {value} | " + " | ".join(cells.get(m, "-") for m in labels) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
