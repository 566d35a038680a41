"""Ablation: ROC curves of every method, metrics with confidence intervals, convergence, CMLE vs MSE, Fig. 9."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import plots
from app.components import guard, require_run, require_table
from app.tables import ci_table, experiment_records, fig9_data, metrics_table, paired_table, per_task_box, roc_data
from cmg_core.significance import significance_note

EXPERIMENT_HINT = ("`cmg experiment` writes it (per-task results in `analysis/experiment.json`, "
                   "box-plot data in `analysis/fig9.json`).")


def roc_section(run) -> None:
    st.subheader("ROC curves")
    if not (require_table(run, "scores") and require_table(run, "images")):
        return
    methods = run.scored_methods()
    default = [m for m in methods if "@" not in m or m == "raw@knn"] or methods
    picked = st.multiselect("Methods", methods, default=default, key="ab_methods")
    st.caption("`<method>` is scored by Eq.14 (Mahalanobis), `<method>@knn` by the mean distance to the k nearest "
               "normal training features (`detector.knn_k`); `raw` is the frozen trunk's features without training.")
    if not picked:
        st.info("Pick at least one method.")
        return
    curves, aucs = roc_data(run, picked)
    if not curves:
        st.info("This run's test set has no anomalies (one-class training): there is no ROC curve. The share of "
                "held-out normal images each threshold flags is in the metrics table below.")
        return
    st.plotly_chart(plots.roc_curves(curves, aucs), key="ab_roc")


def metrics_section(run) -> None:
    st.subheader("AUROC / AUPR / FPR@95")
    exp = run.analysis("experiment")
    rec = experiment_records(exp) if exp else pd.DataFrame()
    if not rec.empty:
        ci = ci_table(rec)
        show = pd.DataFrame(index=ci.index)
        show["tasks"] = ci["tasks"]
        for k, label in (("auroc", "AUROC %"), ("aupr", "AUPR %"), ("fpr95", "FPR@95 %")):
            if k in ci.columns:
                show[label] = [f"{m:.2f} ± {h:.2f}" for m, h in zip(ci[k], ci[f"{k}_ci"])]
        st.dataframe(show, width="stretch")
        st.caption(f"Mean ± 95% t-interval half-width over {int(ci['tasks'].max())} tasks "
                   "(analysis/experiment.json, `cmg_core.metrics.mean_ci`).")
        if "auroc" in ci.columns:
            st.plotly_chart(plots.metrics_bar(ci, "auroc", "Mean AUROC (%) over tasks, 95% CI"), key="ab_ci_bar")
    table = metrics_table(run)
    if table is not None and not table.empty:
        st.markdown("**This run** (single task):")
        st.dataframe(table.style.format("{:.2f}"), width="stretch")
    elif rec.empty:
        st.info("No metrics yet (metrics.json is written when scoring finishes).")
    if rec.empty:
        st.info("No confidence intervals: this run has no per-task results. " + EXPERIMENT_HINT)


def paired_section(run) -> None:
    """The experiment's paired comparisons against ssd and raw@knn (shown only for a run with per-task results)."""
    exp = run.analysis("experiment")
    paired = paired_table(exp) if exp else pd.DataFrame()
    if paired.empty:
        return
    st.markdown("**Paired comparisons over tasks** (AUROC, method − reference):")
    st.dataframe(paired.drop(columns="metric"), hide_index=True, width="stretch")
    st.caption(significance_note(paired) + " (`cmg_core.significance`; `cmg experiment` writes it to "
               "significance.csv and results.md)")


def e2_history(run) -> pd.DataFrame:
    if not run.has("history"):
        return pd.DataFrame()
    h = run.history()
    if h.empty or "stage" not in h.columns:
        return pd.DataFrame()
    return h[h["stage"] == "e2"].dropna(axis=1, how="all")


def convergence_section(run) -> None:
    st.subheader("Convergence (E2 training)")
    e2 = e2_history(run)
    if e2.empty:
        st.info("No E2 training history (history.jsonl stage `e2`) in this run.")
        return
    numeric = [c for c in e2.columns if c not in ("stage", "method", "epoch") and pd.api.types.is_numeric_dtype(e2[c])]
    auc = [c for c in numeric if "auroc" in c]
    loss = [c for c in numeric if c not in auc]
    c1, c2 = st.columns(2)
    with c1:
        metric = st.selectbox("Loss term", loss, index=loss.index("loss") if "loss" in loss else 0, key="ab_loss") \
            if loss else None
        if metric:
            st.plotly_chart(plots.epoch_lines(e2.dropna(subset=[metric]), metric, "method",
                                              f"E2 {metric} per epoch", metric), key="ab_conv_loss")
    with c2:
        if auc:
            st.plotly_chart(plots.epoch_lines(e2.dropna(subset=[auc[0]]), auc[0], "method",
                                              "Test AUROC per epoch (recorded for plots only)", "AUROC"),
                            key="ab_conv_auc")
        else:
            st.info("No AUROC per epoch recorded (train.eval_every_epoch was off).")


def cmle_vs_mse(run) -> None:
    st.subheader("CMLE vs MSE")
    st.caption("`cmg` aligns E2 with the caption neighbourhoods through CMLE (LLE weights, Eq. 13); `cmg-mse` "
               "instead regresses the caption embeddings with an MSE term.")
    have = [m for m in ("cmg", "cmg-mse") if m in run.methods]
    if len(have) < 2:
        st.info(f"This run trained {have or 'neither'}; train both `cmg` and `cmg-mse` to compare them.")
        return
    table = metrics_table(run)
    if table is not None and set(have) <= set(table.index):
        cols = st.columns(len(table.columns))
        for col, k in zip(cols, table.columns):
            a, b = float(table.loc["cmg", k]), float(table.loc["cmg-mse", k])
            col.metric(f"{k.upper()} cmg", f"{a:.2f}", delta=f"{a - b:+.2f} vs cmg-mse",
                       delta_color="inverse" if k == "fpr95" else "normal")
    e2 = e2_history(run)
    if not e2.empty:
        sub = e2[e2["method"].isin(have)]
        terms = [c for c in ("global", "mse", "simclr") if c in sub.columns]
        if terms:
            long = sub.melt(id_vars=["method", "epoch"], value_vars=terms, var_name="term").dropna()
            long = long[long["value"] != 0]
            long["series"] = long["method"] + " · " + long["term"]
            st.plotly_chart(plots.epoch_lines(long, "value", "series", "Loss terms of cmg and cmg-mse", "loss"),
                            key="ab_cmle_mse")


def fig9_section(run) -> None:
    st.subheader("Fig. 9: mask type (hard vs soft)")
    st.caption("CMG's AUROC per task with hard masks (region set to 0) and soft masks (region scaled by a "
               "small constant), next to RID's validation accuracy.")
    df = fig9_data(run)
    if df is None:
        st.info("No data for the Fig. 9 box plot in this run. " + EXPERIMENT_HINT
                + " (with `experiment.mask_ablation` on to train both mask types).")
        box = per_task_box(run)
        if box is not None:
            st.plotly_chart(plots.box_plot(box, "group", "value", "AUROC over tasks per method "
                                           "(analysis/experiment.json)").update_yaxes(title="AUROC %"),
                            key="ab_box_tasks")
        return
    if "mask" in df.columns:
        c1, c2 = st.columns(2)
        if "auroc" in df.columns and df["auroc"].notna().any():
            c1.plotly_chart(plots.box_plot(df.dropna(subset=["auroc"]), "mask", "auroc", "CMG AUROC by mask type")
                            .update_yaxes(title="AUROC %"), key="ab_fig9_auroc")
        if "rid_val_acc" in df.columns and df["rid_val_acc"].notna().any():
            c2.plotly_chart(plots.box_plot(df.dropna(subset=["rid_val_acc"]), "mask", "rid_val_acc",
                                           "RID validation accuracy by mask type").update_yaxes(title="accuracy"),
                            key="ab_fig9_rid")
        if df["mask"].nunique() < 2:
            st.caption("Only one mask type was trained; `experiment.mask_ablation` trains the other one too.")
    else:
        st.plotly_chart(plots.box_plot(df, "group", "value", "Fig. 9"), key="ab_fig9")


def render() -> None:
    st.title("Ablation")
    run = require_run()
    if run is None:
        return
    for name, fn in (("the ROC curves", roc_section), ("the metrics table", metrics_section),
                     ("the paired comparisons", paired_section),
                     ("the convergence curves", convergence_section), ("CMLE vs MSE", cmle_vs_mse),
                     ("the Fig. 9 box plot", fig9_section)):
        with guard(name):
            fn(run)


with guard("the Ablation page"):
    render()
