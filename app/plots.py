"""Plotly figures for the app.  Every function takes arrays / DataFrames and returns a figure."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]
METHOD_COLORS = {"ssd": "#7f7f7f", "ssd+er": "#1f77b4", "ssd+le": "#2ca02c", "cmg": "#d62728", "cmg-mse": "#ff7f0e"}
GREY = "#c8c8c8"


def method_color(method: str, i: int = 0) -> str:
    return METHOD_COLORS.get(method, PALETTE[i % len(PALETTE)])


def _layout(fig: go.Figure, title: str | None = None, height: int = 380, **kw) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0, xanchor="left", y=0.99, yanchor="top", font=dict(size=15))
                      if title else None,
                      height=height, margin=dict(l=10, r=10, t=70 if title else 30, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), **kw)
    return fig


def metrics_bar(table: pd.DataFrame, metric: str = "auroc", title: str | None = None) -> go.Figure:
    """Bar chart of one metric per method; `table` indexed by method with a `metric` column
    (and optionally `<metric>_ci`, drawn as error bars)."""
    methods = list(table.index)
    err = table[f"{metric}_ci"].to_numpy() if f"{metric}_ci" in table.columns else None
    fig = go.Figure(go.Bar(
        x=methods, y=table[metric].to_numpy(), marker_color=[method_color(m, i) for i, m in enumerate(methods)],
        error_y=dict(type="data", array=err) if err is not None else None,
        text=[f"{v:.1f}" for v in table[metric]], textposition="outside"))
    return _layout(fig, title or f"{metric.upper()} (%) on the test set", yaxis=dict(range=[0, 105]))


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], aurocs: dict[str, float] | None = None) -> go.Figure:
    """ROC curves of several methods on one plot: `curves` maps method -> (fpr, tpr)."""
    fig = go.Figure()
    for i, (m, (fpr, tpr)) in enumerate(curves.items()):
        label = f"{m} (AUROC {aurocs[m]:.1f})" if aurocs and m in aurocs else m
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=label, line=dict(color=method_color(m, i), width=2)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(color="#999", dash="dot", width=1), showlegend=False))
    fig.update_xaxes(title="false positive rate", range=[0, 1])
    fig.update_yaxes(title="true positive rate", range=[0, 1.02])
    return _layout(fig, "ROC curves (test images, anomaly = positive)", height=460)


def epoch_lines(df: pd.DataFrame, y: str, color: str | None = "method", title: str | None = None,
                y_title: str | None = None, reference: float | None = None, reference_label: str = "") -> go.Figure:
    """One line per `color` group of `y` against `epoch` (history records)."""
    fig = go.Figure()
    groups = [(None, df)] if color is None or color not in df.columns else list(df.groupby(color, sort=False))
    for i, (name, g) in enumerate(groups):
        g = g.sort_values("epoch")
        fig.add_trace(go.Scatter(x=g["epoch"], y=g[y], mode="lines+markers", name=str(name if name is not None else y),
                                 line=dict(color=method_color(str(name), i))))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dot", line_color="#999", annotation_text=reference_label)
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title=y_title or y)
    return _layout(fig, title)


def multi_lines(df: pd.DataFrame, ys: Sequence[str], title: str | None = None, y_title: str = "",
                reference: float | None = None, reference_label: str = "") -> go.Figure:
    """Several columns of one history table against `epoch` (e.g. RID train_acc and val_acc)."""
    fig = go.Figure()
    d = df.sort_values("epoch")
    for i, y in enumerate(ys):
        fig.add_trace(go.Scatter(x=d["epoch"], y=d[y], mode="lines+markers", name=y,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dot", line_color="#999", annotation_text=reference_label)
    fig.update_xaxes(title="epoch")
    fig.update_yaxes(title=y_title)
    return _layout(fig, title)


def score_histogram(train_scores: np.ndarray, threshold: float | None = None, value: float | None = None,
                    title: str | None = None, value_label: str = "this image") -> go.Figure:
    """Histogram of normal training scores with the threshold line and one image's score."""
    fig = go.Figure(go.Histogram(x=np.asarray(train_scores), nbinsx=30, name="normal training images",
                                 marker_color="#9ecae1", opacity=0.9))
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#555",
                      annotation_text="threshold", annotation_position="top left")
    if value is not None:
        over = threshold is not None and value > threshold
        fig.add_vline(x=value, line_width=3, line_color="#d62728" if over else "#2ca02c",
                      annotation_text=value_label, annotation_position="top right")
    fig.update_xaxes(title="anomaly score (higher = more anomalous)")
    fig.update_yaxes(title="images")
    return _layout(fig, title, height=260, showlegend=False)


def probability_bars(probs: Sequence[float], chosen: int | None = None, reference: int | None = None,
                     title: str | None = None, reference_label: str = "CMER") -> go.Figure:
    """Bars of per-region probabilities (RID) with the chosen region highlighted."""
    p = np.asarray(probs, dtype=np.float64)
    colors = ["#d62728" if i == chosen else "#9ecae1" for i in range(len(p))]
    fig = go.Figure(go.Bar(x=[f"region {i}" for i in range(len(p))], y=p, marker_color=colors,
                           text=[f"{v:.2f}" for v in p], textposition="outside"))
    if reference is not None and 0 <= reference < len(p):
        fig.add_annotation(x=f"region {reference}", y=float(p[reference]), text=f"{reference_label} ★",
                           showarrow=True, arrowhead=2, ay=-35)
    fig.update_yaxes(range=[0, max(1.0, float(p.max()) * 1.25) if len(p) else 1.0], title="probability")
    return _layout(fig, title, height=260, showlegend=False)


def region_scores_bars(scores: Sequence[float], chosen: int | None = None, title: str | None = None) -> go.Figure:
    """E1 matching score of each masked variant (CMER keeps the highest)."""
    s = np.asarray(scores, dtype=np.float64)
    colors = ["#2ca02c" if i == chosen else "#c7c7c7" for i in range(len(s))]
    fig = go.Figure(go.Bar(x=[f"mask {i}" for i in range(len(s))], y=s, marker_color=colors,
                           text=[f"{v:.3f}" for v in s], textposition="outside"))
    fig.update_yaxes(title="E1 matching score")
    return _layout(fig, title, height=260, showlegend=False)


def dcor_heatmap(matrix: pd.DataFrame, title: str | None = "Distance correlation") -> go.Figure:
    """Annotated heatmap of a square, labelled matrix (values in [0, 1])."""
    z = matrix.to_numpy(dtype=np.float64)
    fig = go.Figure(go.Heatmap(z=z, x=list(matrix.columns), y=list(matrix.index),
                               zmin=min(0.0, float(np.nanmin(z))), zmax=1,
                               colorscale="Blues", text=np.round(z, 3), texttemplate="%{text:.3f}",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=430)


def box_plot(df: pd.DataFrame, x: str = "method", y: str = "auroc", title: str | None = None) -> go.Figure:
    """Box plot of `y` per `x` group with the individual points shown."""
    fig = go.Figure()
    for i, (name, g) in enumerate(df.groupby(x, sort=False)):
        fig.add_trace(go.Box(y=g[y], name=str(name), boxpoints="all", jitter=0.3, pointpos=0,
                             marker_color=method_color(str(name), i)))
    fig.update_yaxes(title=y)
    return _layout(fig, title, height=420, showlegend=False)


def latent_scatter(coords: np.ndarray, rows: np.ndarray, color_values: np.ndarray, color_kind: str,
                   hover: Sequence[str], selected_rows: Sequence[int] | None = None, title: str | None = None,
                   color_title: str = "") -> go.Figure:
    """2-D embedding scatter.

    coords (N, 2); rows (N,) images.csv row of each point (sent back as customdata on selection);
    color_values (N,) categories (`color_kind="category"`) or numbers (`"continuous"`); hover (N,) text.
    Points not in `selected_rows` are drawn grey and faint (still visible) when a selection exists.
    """
    coords = np.asarray(coords, dtype=np.float64)
    rows = np.asarray(rows)
    hover = np.asarray(hover, dtype=object)
    sel = set(int(r) for r in selected_rows) if selected_rows else None
    trace_cls = go.Scattergl if len(rows) > 3000 else go.Scatter
    unselected = dict(marker=dict(color=GREY, opacity=0.35))
    fig = go.Figure()

    def add(mask: np.ndarray, name: str, marker: dict, showlegend: bool = True):
        idx = np.flatnonzero(mask)
        selectedpoints = None
        if sel is not None:
            selectedpoints = [k for k, r in enumerate(rows[idx]) if int(r) in sel]
        fig.add_trace(trace_cls(
            x=coords[idx, 0], y=coords[idx, 1], mode="markers", name=name, marker=marker,
            customdata=[[int(r)] for r in rows[idx]], hovertext=list(hover[idx]), hovertemplate="%{hovertext}<extra></extra>",
            selectedpoints=selectedpoints, unselected=unselected, selected=dict(marker=dict(opacity=1.0)),
            showlegend=showlegend))

    if color_kind == "continuous":
        vals = np.asarray(color_values, dtype=np.float64)
        add(np.ones(len(rows), bool), color_title or "value",
            dict(color=vals, colorscale="Viridis", size=7, showscale=True,
                 colorbar=dict(title=color_title, thickness=12)), showlegend=False)
    else:
        cats = np.asarray(color_values).astype(str)
        for i, c in enumerate(pd.unique(cats)):
            add(cats == c, c, dict(color=PALETTE[i % len(PALETTE)], size=7))
    fig.update_xaxes(showticklabels=False, title=None)
    fig.update_yaxes(showticklabels=False, title=None)
    return _layout(fig, title, height=460, dragmode="lasso", clickmode="event+select")
