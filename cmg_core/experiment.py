"""`cmg experiment`: the paper's protocol (one task per seed, every method), mean +- 95% CI over tasks, and the
data behind each analysis figure. Finished tasks are reused, so an interrupted experiment resumes.

Output (`<experiment.out_dir>/<name>/`): config.yaml, task_seed<k>/ run folders (+ task_seed<k>_mask_<m>/ for
Fig.9), results.csv (per task and method), summary.csv, significance.csv (paired comparisons against ssd and
raw@knn, `cmg_core.significance`), results.md, analysis/*.json. Every task's run folder
also gets analysis/experiment.json (the whole table) so the app can show confidence intervals.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from .config import RunConfig, load_config, save_config, to_dict
from .errors import ConfigError, DataError
from .metrics import mean_ci
from .protocol import departures
from .runs import Run, write_csv, write_json, write_text
from .significance import paired_comparisons, significance_markdown
from .methods import primary_scorer, split_key
from .train import method_label, train_run
from .utils import machine_description

METRICS = ("auroc", "aupr", "fpr95")
Progress = Callable[[str, int, int], None]


def task_config(cfg: RunConfig, exp_dir: Path, seed: int, mask: str | None = None) -> RunConfig:
    """The run config of one task of the experiment (and, with `mask`, of its Fig.9 mask-type run)."""
    name = f"task_seed{seed}" + (f"_mask_{mask}" if mask else "")
    changes = {"name": name, "out_dir": str(exp_dir), "task": dataclasses.replace(cfg.task, seed=seed)}
    if mask:
        changes["cmer"] = dataclasses.replace(cfg.cmer, mask=mask)
        changes["train"] = dataclasses.replace(cfg.train, methods=("cmg",))
    return dataclasses.replace(cfg, **changes)


def train_or_reuse(cfg: RunConfig, progress: Progress | None, log: Callable[[str], None],
                   extra_scorings: tuple = ()) -> Run:
    """The finished run of `cfg` (out_dir/name) when there is one, else trained (or resumed) now."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if (run_dir / "run.json").is_file() and Run.open(run_dir).status == "done":
        log(f"{cfg.name}: finished earlier, reused")
        return Run.open(run_dir)
    t0 = time.time()
    train_run(cfg, progress=progress, extra_scorings=extra_scorings)
    log(f"{cfg.name}: trained in {time.time() - t0:.0f} s")
    return Run.open(run_dir)


def metric_rows(metrics: dict, reading: str = "lle") -> list[dict]:
    """A run's metrics.json ({scored key: metrics}) as table rows: method (with its CMLE reading), scorer,
    auroc, aupr, fpr95 (NaN when absent, e.g. a one-class run)."""
    rows = []
    for key, met in metrics.items():
        method, scorer = split_key(key)
        rows.append({"method": method_label(method, reading), "scorer": scorer,
                     **{m: met.get(m, float("nan")) for m in METRICS}})
    return rows


def summarize(per_task: pd.DataFrame) -> pd.DataFrame:
    """Per method, scorer and metric: mean and 95% CI half-width over tasks (t distribution)."""
    rows = []
    if "scorer" not in per_task:  # tables written before scorers existed
        per_task = per_task.assign(scorer="mahalanobis")
    for (method, scorer), g in per_task.groupby(["method", "scorer"], sort=False):
        row = {"method": method, "scorer": scorer, "tasks": len(g)}
        for m in METRICS:
            mean, hw = mean_ci(g[m].values)
            row[m], row[f"{m}_ci95"] = mean, hw
        rows.append(row)
    return pd.DataFrame(rows)


def significance_of(exp_dir: str | Path) -> pd.DataFrame:
    """The paired comparisons (`cmg_core.significance.paired_comparisons`, columns as in significance.csv) of an
    experiment folder's results.csv, e.g. for an experiment written before significance.csv existed."""
    path = Path(exp_dir) / "results.csv"
    if not path.is_file():
        raise DataError(f"{exp_dir} has no results.csv: not a finished experiment folder (`cmg experiment` writes it)")
    return paired_comparisons(pd.read_csv(path))


def time_split(runs) -> str:
    """Markdown: mean seconds per task of each stage (run.json stage_seconds; E1, CMER and RID are shared by the
    methods of a task), and of a whole task."""
    frames = [r.info.get("stage_seconds") for r in runs if r.info.get("stage_seconds")]
    if not frames:
        return ""
    df = pd.DataFrame(frames)
    walls = [r.info.get("wall_time_s") for r in runs if r.info.get("wall_time_s")]
    lines = ["| stage | mean s per task |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in df.mean().items()]
    if walls:
        lines.append(f"| whole task | {sum(walls) / len(walls):.0f} |")
    return "How a task's time splits (tasks trained in this invocation or earlier):\n\n" + "\n".join(lines)


def markdown_table(summary: pd.DataFrame) -> str:
    """Each method's primary score first (Mahalanobis, or its own rule: bliss, she), then the k-NN rows; methods in
    training order within a group."""
    lines = ["| method | score | AUROC | AUPR | FPR95 | tasks |", "|---|---|---|---|---|---|"]
    own = [scorer == primary_scorer(method) for method, scorer in zip(summary.method, summary.scorer)]
    order = summary.assign(_m=[not o for o in own]).sort_values("_m", kind="stable")  # each method's own score first
    for _, r in order.iterrows():
        cells = [f"{r[m]:.2f} ± {r[m + '_ci95']:.2f}" for m in METRICS]
        lines.append(f"| {r['method']} | {r['scorer']} | " + " | ".join(cells) + f" | {r['tasks']} |")
    return "\n".join(lines)


def protocol_words(cfg: RunConfig) -> str:
    """'honest' or the departures the protocol section turns on, in words (next to every number of the table)."""
    words = departures(cfg.protocol)
    return "honest (final-epoch models, RID masks, no test captions or labels)" if not words else \
        "**departs from the honest protocol**: " + "; ".join(words)


def check_experiment_folder(exp_dir: Path, cfg: RunConfig) -> None:
    """An experiment (or audit) folder is written into only when it is new, empty, or holds this config's (up to
    experiment.out_dir and experiment.task_seeds: tasks are run folders of their own, so a table of more or fewer
    tasks reuses the finished ones)."""
    old = exp_dir / "config.yaml"
    if exp_dir.is_dir() and not old.is_file() and any(exp_dir.iterdir()):
        raise ConfigError(f"{exp_dir} exists and is not an experiment folder (no config.yaml); nothing was changed - "
                          "choose another name (--set name=...)")
    if old.is_file():
        a, b = to_dict(load_config(old)), to_dict(cfg)
        for d in (a, b):
            d["experiment"].pop("out_dir", None), d["experiment"].pop("task_seeds", None)
        if a != b:
            raise ConfigError(f"experiment folder {exp_dir} holds an experiment with a different config; "
                              "choose another name (--set name=...) or remove the folder")


def run_experiment(cfg: RunConfig, progress: Progress | None = None, log: Callable[[str], None] = print,
                   analyses: bool = True) -> Path:
    """Train (or reuse) every task, write the results table and the analysis data; returns the folder."""
    exp_dir = Path(cfg.experiment.out_dir) / cfg.name
    check_experiment_folder(exp_dir, cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, exp_dir / "config.yaml")
    t0 = time.time()
    rows, runs, mask_runs = [], {}, {}
    for seed in cfg.experiment.task_seeds:
        run = train_or_reuse(task_config(cfg, exp_dir, seed), progress, log)
        runs[seed] = run
        rows += [{"seed": seed, "wall_time_s": run.info.get("wall_time_s"), **r}
                 for r in metric_rows(run.metrics(), cfg.cmle.loss)]
        if cfg.experiment.mask_ablation:
            other = "soft" if cfg.cmer.mask == "hard" else "hard"
            mask_runs[seed] = train_or_reuse(task_config(cfg, exp_dir, seed, other), progress, log)
    per_task = pd.DataFrame(rows)
    summary = summarize(per_task)
    paired = paired_comparisons(per_task)
    split = time_split(runs.values())
    write_csv(exp_dir / "results.csv", per_task)
    write_csv(exp_dir / "summary.csv", summary)
    write_csv(exp_dir / "significance.csv", paired)
    wall = time.time() - t0
    write_text(exp_dir / "results.md",
        f"# {cfg.name}: {len(runs)} tasks ({cfg.data.name}, profile {cfg.model.profile})\n\n"
        f"Mean ± 95% CI (t distribution) over tasks with seeds {list(cfg.experiment.task_seeds)}; final-epoch "
        f"models only. Scores: mahalanobis (Eq.14, detector.n_clusters={cfg.detector.n_clusters}), knn (mean "
        f"distance to the {cfg.detector.knn_k} nearest normal training features); method raw = the frozen "
        f"trunk's features, no training.\n\nProtocol: {protocol_words(cfg)}\n\n{markdown_table(summary)}\n\nWall time of this invocation: {wall:.0f} s "
        "(tasks finished earlier are reused, not retrained).\n\n"
        f"{split}\n\n"
        f"Machine: {machine_description(cfg.train.device)}\n\n{significance_markdown(paired)}\n")
    table = {"per_task": per_task.to_dict("records"), "summary": summary.to_dict("records")}
    if analyses:
        from .figures import write_analyses

        write_analyses(cfg, exp_dir, runs, mask_runs, per_task, log=log)
    for run in runs.values():
        write_json(run.path / "analysis" / "experiment.json", table)
    write_json(exp_dir / "analysis" / "experiment.json", table)
    log(markdown_table(summary))
    log(f"experiment folder: {exp_dir} ({wall:.0f} s)")
    return exp_dir
