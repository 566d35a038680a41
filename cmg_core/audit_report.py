"""What `cmg audit` reports, without training (so the app's Reproduction page needs no torch): the paper's numbers,
the per-row summary and tables of an audit's per-task AUROCs, the Fig.10 curves, and reading an audit folder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError
from .metrics import mean_ci
from .runs import read_json
from .utils import atomic_path

AUDIT_METHODS = ("ssd", "ssd+er", "ssd+le[lle]", "ssd+le[supcon]", "cmg[lle]", "cmg[supcon]", "cmda")
# The paper's UCM numbers (Chen et al., Table I / II; AUROC %, 6 normal classes): what the audit tries to reach.
PAPER = {"ssd": 85.36, "ssd+er": 95.45, "ssd+le[lle]": 93.44, "ssd+le[supcon]": 93.44, "cmg[lle]": 99.71,
         "cmg[supcon]": 99.71, "cmda": 93.37}
PAPER_EPOCH1 = 95.0  # its Fig.10: CMG at about 95 % AUROC after the first epoch of training from scratch


def curve_band(curves: list) -> dict:
    """Per-epoch mean and 95 % CI half-width over tasks of [(epoch, auroc)] curves (epochs every task has)."""
    epochs = sorted(set.intersection(*(set(e for e, _ in c) for c in curves)))
    vals = [[dict(c)[e] for c in curves] for e in epochs]
    stats = [mean_ci(v) for v in vals]
    return {"epoch": epochs, "mean": [s[0] for s in stats], "ci95": [s[1] for s in stats], "tasks": len(curves)}


FIG10_METHODS = ("ssd", "cmda", "cmg[lle]", "cmg[supcon]")


def fig10_figure(bands: dict, methods: Sequence[str] = FIG10_METHODS, title: str | None = None):
    """The paper's Fig.10 for one protocol row: per-epoch test AUROC (mean line, 95 % CI band over tasks) of each
    method, {method: curve_band(...)}, with the paper's ≈95 after epoch 1 marked. A plotly figure."""
    import plotly.graph_objects as go

    colors = {"ssd": "#7f7f7f", "cmda": "#2ca02c", "cmg[lle]": "#d62728", "cmg[supcon]": "#ff7f0e"}
    fig = go.Figure()
    for m in methods:
        if m not in bands:
            continue
        b, c = bands[m], colors.get(m, "#1f77b4")
        lo = [x - h for x, h in zip(b["mean"], b["ci95"])]
        hi = [x + h for x, h in zip(b["mean"], b["ci95"])]
        fig.add_trace(go.Scatter(x=b["epoch"] + b["epoch"][::-1], y=hi + lo[::-1], fill="toself", opacity=0.2,
                                 line=dict(width=0, color=c), hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=b["epoch"], y=b["mean"], mode="lines+markers", name=m, line=dict(color=c)))
    fig.add_trace(go.Scatter(x=[1], y=[PAPER_EPOCH1], mode="markers", name="paper: CMG after epoch 1",
                             marker=dict(symbol="star", size=12, color="#000")))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="test AUROC %", height=380,
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


def write_fig10_html(folder: Path, fig10: dict) -> None:
    """fig10.html in the audit folder: one Fig.10 per row (needs plotly, the [app] extra; skipped without it)."""
    try:
        import plotly.io as pio
    except ImportError:
        return
    parts = [pio.to_html(fig10_figure(bands, title=label), full_html=False, include_plotlyjs=i == 0)
             for i, (label, bands) in enumerate(fig10["rows"].items())]
    with atomic_path(Path(folder) / "fig10.html") as tmp:
        tmp.write_text("<html><head><meta charset='utf-8'><title>Fig.10 per protocol</title></head><body>"
                       + "".join(parts) + "</body></html>")


def audit_summary(per_task: pd.DataFrame) -> pd.DataFrame:
    """Per row and method: mean and 95 % CI of the reported and the epoch-1 AUROC, and the mean change against
    the honest row (paired by task)."""
    honest = per_task[per_task.kind == "honest"].set_index(["seed", "method"])
    out = []
    for (label, method), g in per_task.groupby(["row", "method"], sort=False):
        base = honest.loc[list(zip(g.seed, g.method)), "reported"].to_numpy()
        row = {"row": label, "kind": g.kind.iloc[0], "method": method, "tasks": len(g),
               "delta": float(np.mean(g.reported.to_numpy() - base))}
        for col in ("reported", "epoch1"):
            v = g[col].dropna()
            row[col], row[col + "_ci95"] = mean_ci(v.values) if len(v) else (float("nan"), float("nan"))
        out.append(row)
    return pd.DataFrame(out)


def audit_table(summary: pd.DataFrame, col: str = "reported", delta: bool = True) -> pd.DataFrame:
    """Rows (in audit order) x methods of "mean ± CI" strings (with "(+Δ)" against the honest row), and the
    paper's row when `col` is the reported AUROC."""
    methods = [m for m in AUDIT_METHODS if m in set(summary.method)]
    out = {}
    for label, g in summary.groupby("row", sort=False):
        x = g.set_index("method")
        out[label] = [f"{x.loc[m, col]:.2f} ± {x.loc[m, col + '_ci95']:.2f}"
                      + (f" ({x.loc[m, 'delta']:+.1f})" if delta and x.loc[m, "kind"] != "honest" else "")
                      for m in methods]
    if col == "reported":
        out["paper (Table I/II)"] = [f"{PAPER[m]:.2f}" for m in methods]
    return pd.DataFrame.from_dict(out, orient="index", columns=methods)


def read_audit(folder: Path) -> tuple[pd.DataFrame, dict]:
    """(audit.csv, fig10.json) of an audit folder."""
    folder = Path(folder)
    if not (folder / "audit.csv").is_file():
        raise ConfigError(f"{folder} is not an audit folder (no audit.csv); `cmg audit --config ...` writes one")
    fig = read_json(folder / "fig10.json") if (folder / "fig10.json").is_file() else {"rows": {}}
    return pd.read_csv(folder / "audit.csv"), fig


def table_markdown(df: pd.DataFrame) -> str:
    """A table of audit_table as markdown (its index is the row label)."""
    lines = ["| row | " + " | ".join(df.columns) + " |", "|---|" + "---|" * len(df.columns)]
    return "\n".join(lines + [f"| {i} | " + " | ".join(r) + " |" for i, r in zip(df.index, df.values.tolist())])
