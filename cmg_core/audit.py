"""`cmg audit --config CONFIG`: where the paper's CMG 99.71 on UCM comes from. On the experiment's tasks, the honest
protocol, then each departure of the authors' released code alone, then cumulatively (cmg_core.protocol).

Reuse: every scoring-only departure (masks, BatchNorm mode, reported epoch) is read from the honest run's per-epoch
history, which records the test AUROC of every scoring a row needs (`train_run(extra_scorings=...)`); a training
departure retrains only the methods it changes, in a run folder of its own whose E1 and RID are the honest run's.

Output `<experiment.out_dir>/<name>_audit/`: config.yaml, task_seed<k>/ (honest, every audit method),
task_seed<k>__<departures>/ (retrained methods), audit.csv (per task, row and method: AUROC reported and after
epoch 1), audit.md (mean ± 95 % CI over tasks, change against the honest row, the paper's numbers), fig10.json and
fig10.html (per-epoch test AUROC curves, mean and band over tasks, of the honest row and each best-epoch row).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .audit_report import (AUDIT_METHODS, PAPER, PAPER_EPOCH1, audit_summary, audit_table, curve_band,
                           table_markdown, write_fig10_html)
from .config import RunConfig, save_config
from .errors import ConfigError
from .experiment import check_experiment_folder, task_config, train_or_reuse
from .protocol import Scoring, auroc_key
from .runs import Run, check_run_folder, write_csv, write_json, write_text
from .train.evaluate import history_records
from .utils import atomic_path, machine_description



@dataclass(frozen=True)
class Departure:
    """One departure as the audit applies it: changes to the Scoring, the reported epoch, or protocol settings to
    retrain with (`train`: values, or functions of the run config), which change only `methods` (empty: every
    audit method)."""
    name: str
    label: str
    scoring: dict = field(default_factory=dict)
    best: bool = False
    train: dict = field(default_factory=dict)
    methods: tuple = ()


DEPARTURES = (  # in the cumulative order
    Departure("best_epoch", "reported AUROC = maximum over epochs of the test AUROC", best=True),
    Departure("rid_on_test", "RID's epoch chosen on the normal test images", scoring={"masks": "rid_test"}),
    Departure("test_captions", "test images masked by CMER with their own captions", scoring={"masks": "captions"}),
    Departure("bn_train", "BatchNorm in train mode over class-pure batches", scoring={"bn": "train"}),
    Departure("supcon_batch", "SupCon clusters refitted on every mini-batch", train={"supcon_labels": "batch"},
              methods=("ssd+le[supcon]", "cmg[supcon]")),
    Departure("released_epochs", "SSD trained 2.5 x e2.epochs, the others e2.epochs (released: SSD 200, CMG 80)",
              train={"method_epochs": lambda cfg: {"ssd": round(cfg.e2.epochs * 200 / 80)}}, methods=("ssd",)),
    Departure("caption_items", "an epoch passes each image once per caption (released loaders)",
              train={"train_items": "captions"}),
    Departure("anomalies_unmasked", "diagnostic: anomalies not masked, normal images as above",
              scoring={"anomaly_masks": "none"}),
)
BY_NAME = {d.name: d for d in DEPARTURES}


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # honest | alone | cumulative
    scoring: Scoring
    best: bool
    train: tuple  # names of the training departures, in order


def audit_rows(names: Sequence[str]) -> list[Row]:
    """The honest row, each departure of `names` alone, then cumulatively (in DEPARTURES order)."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown departure(s) {unknown}; expected some of {list(BY_NAME)}")
    chosen = [d for d in DEPARTURES if d.name in names]

    def row(label, kind, deps):
        changes = {k: v for d in deps for k, v in d.scoring.items()}
        return Row(label, kind, Scoring(**changes), any(d.best for d in deps), tuple(d.name for d in deps if d.train))
    rows = [row("honest protocol", "honest", [])]
    rows += [row(d.name, "alone", [d]) for d in chosen]
    rows += [row("+ " + d.name, "cumulative", chosen[: i + 1]) for i, d in enumerate(chosen) if i > 0]
    return rows


def variant(method: str, train: Sequence[str]) -> tuple:
    """The training departures of `train` that change `method` (the run folder it is read from)."""
    return tuple(n for n in train if not BY_NAME[n].methods or method in BY_NAME[n].methods)


def _variant_config(cfg: RunConfig, names: tuple, methods: Sequence[str]) -> RunConfig:
    changes = {k: v(cfg) if callable(v) else v for n in names for k, v in BY_NAME[n].train.items()}
    protocol = dataclasses.replace(cfg.protocol, **changes)
    return dataclasses.replace(cfg, name=cfg.name + "__" + "+".join(names), protocol=protocol,
                               train=dataclasses.replace(cfg.train, methods=tuple(methods)))


def _train(cfg: RunConfig, scorings: tuple, log, progress, copy_from: Path | None = None) -> Path:
    run_dir = Path(cfg.out_dir) / cfg.name
    done = (run_dir / "run.json").is_file() and Run.open(run_dir).status == "done"
    if copy_from is not None and not done:
        check_run_folder(run_dir)  # the same E1, CMER and RID as the honest run: only the methods retrain
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        for name in ("e1.npz", "rid.npz", "rid_test.npz"):
            if (copy_from / "models" / name).is_file() and not (run_dir / "models" / name).is_file():
                with atomic_path(run_dir / "models" / name) as tmp:
                    shutil.copyfile(copy_from / "models" / name, tmp)
    return train_or_reuse(cfg, progress, log, scorings).path


def audit_task(cfg: RunConfig, exp_dir: Path, seed: int, rows: list[Row], progress=None, log=print) -> dict:
    """Train (or reuse) a task's honest run and its retrained variants: {(variant, method): run folder}."""
    base = task_config(cfg, exp_dir, seed)
    # every row reads the per-epoch history (the honest row's curve, `best_epoch`), whatever the config says
    train = dataclasses.replace(base.train, methods=AUDIT_METHODS, eval_every_epoch=True)
    base = dataclasses.replace(base, train=train, detector=dataclasses.replace(base.detector, scorers=("mahalanobis",)))
    scorings = tuple(dict.fromkeys(r.scoring for r in rows if r.scoring != Scoring()))
    honest = _train(base, scorings, log, progress)
    runs = {((), m): honest for m in AUDIT_METHODS}
    needed = {}
    for r in rows:
        for m in AUDIT_METHODS:
            v = variant(m, r.train)
            if v:
                needed.setdefault(v, []).append(m)
    for v, methods in needed.items():
        methods = list(dict.fromkeys(methods))
        run_dir = _train(_variant_config(base, v, methods), scorings, log, progress, copy_from=honest)
        runs.update({(v, m): run_dir for m in methods})
    return runs


def row_values(runs: dict, row: Row, method: str) -> dict:
    """{reported, epoch1, curve: [(epoch, auroc)]} of one method under one row, from its run's history."""
    hist = history_records(runs[(variant(method, row.train), method)], method)
    key = auroc_key("", row.scoring.key)
    curve = [(r["epoch"], r[key]) for r in hist if key in r]
    if not curve:
        raise ConfigError(f"no per-epoch AUROC {key!r} of {method} recorded; rerun the audit in a new folder")
    first = curve[0][1] if curve[0][0] == 1 else float("nan")
    return {"reported": max(v for _, v in curve) if row.best else curve[-1][1], "epoch1": first, "curve": curve}


def run_audit(cfg: RunConfig, departures: Sequence[str] | None = None, progress=None,
              log: Callable[[str], None] = print) -> Path:
    """Train what the audit needs on every task of `experiment.task_seeds`, write audit.csv/md and fig10.json."""
    names = list(departures) if departures else [d.name for d in DEPARTURES]
    rows = audit_rows(names)
    exp_dir = Path(cfg.experiment.out_dir) / f"{cfg.name}_audit"
    check_experiment_folder(exp_dir, cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, exp_dir / "config.yaml")
    t0 = time.time()
    records, curves = [], {}
    for seed in cfg.experiment.task_seeds:
        runs = audit_task(cfg, exp_dir, seed, rows, progress, log)
        for row in rows:
            for m in AUDIT_METHODS:
                v = row_values(runs, row, m)
                records.append({"seed": seed, "row": row.label, "kind": row.kind, "method": m,
                                "reported": v["reported"], "epoch1": v["epoch1"]})
                if row.best or row.kind == "honest":
                    curves.setdefault(row.label, {}).setdefault(m, []).append(v["curve"])
        text = _write_tables(exp_dir, pd.DataFrame(records), curves, rows, cfg, time.time() - t0)  # after every task
    log(text)
    return exp_dir


def _write_tables(exp_dir: Path, per_task: pd.DataFrame, curves: dict, rows: list[Row], cfg: RunConfig,
                  wall: float) -> str:
    """audit.csv, audit.md, fig10.json/html of the tasks finished so far; returns audit.md's text."""
    write_csv(exp_dir / "audit.csv", per_task)
    fig10 = {"rows": {label: {m: curve_band(c) for m, c in per_m.items()} for label, per_m in curves.items()},
             "paper_epoch1": PAPER_EPOCH1}
    write_json(exp_dir / "fig10.json", fig10)
    write_fig10_html(exp_dir, fig10)
    text = audit_markdown(per_task, rows, cfg, wall)
    write_text(exp_dir / "audit.md", text)
    return text


def audit_markdown(per_task: pd.DataFrame, rows: list[Row], cfg: RunConfig, wall: float) -> str:
    """audit.md: the reported-AUROC table (with the change against the honest row), the epoch-1 table, the
    paper's row, the departures in words, the highest values reached, the machine and the wall time."""
    s = audit_summary(per_task)
    labels = {r.label for r in rows}
    words = "\n".join(f"- `{d.name}`: {d.label}" + (f" (retrains {', '.join(d.methods) or 'every method'})"
                                                     if d.train else "") for d in DEPARTURES if d.name in labels)
    top = s.loc[s.groupby("method", sort=False).reported.idxmax()]
    best = "\n".join(f"- {r.method}: {r.reported:.2f} ± {r.reported_ci95:.2f} (row `{r.row}`; paper "
                     f"{PAPER[r.method]:.2f})" for r in top.itertuples())
    cm = s[s.method == "cmg[supcon]"]
    e1 = cm.loc[cm.epoch1.idxmax()] if len(cm) else None
    seeds = sorted(per_task.seed.unique().tolist())
    return (f"# Audit of {cfg.name}: the released protocol, one departure at a time\n\n"
            f"Tasks: seeds {seeds} ({cfg.data.name}, profile {cfg.model.profile}, e2.epochs {cfg.e2.epochs}, "
            f"test AUROC recorded every {cfg.train.eval_every} epochs and after the first and last: a `best_epoch` "
            "row is the maximum over those epochs). Mean ± 95 % CI over tasks of the Mahalanobis score's test "
            "AUROC; in brackets the change against the honest row (paired by task). Rows other than the honest one "
            "use test data in a way an honest evaluation does not.\n\n"
            f"## Reported AUROC\n\n{table_markdown(audit_table(s))}\n\n"
            f"## After the first epoch (the paper's Fig.10: CMG ≈ {PAPER_EPOCH1:.0f})\n\n"
            f"{table_markdown(audit_table(s, 'epoch1', delta=False))}\n\n"
            f"## Departures\n\n{words}\n\n## Highest reported value per method\n\n{best}\n"
            + (f"- after epoch 1, cmg[supcon] reaches at most {e1.epoch1:.2f} (row `{e1.row}`)\n" if e1 is not None else "")
            + f"\nWall time of this invocation: {wall:.0f} s (finished runs are reused).\n\n"
            f"Machine: {machine_description(cfg.train.device)}\n")
