"""Overview: what the selected run is, and how well each method detects anomalies."""
from __future__ import annotations

import time

import streamlit as st

from app import plots
from app.components import guard, require_run, run_facts
from app.tables import metrics_table


def render() -> None:
    st.title("Overview")
    run = require_run()
    if run is None:
        return
    st.subheader(f"Run `{run.name}`")
    c1, c2 = st.columns([2, 3])
    with c1:
        for label, value in run_facts(run):
            st.markdown(f"**{label}:** {value}")
        created = run.info.get("created")
        if isinstance(created, (int, float)):
            wall = run.info.get("wall_time_s")
            st.markdown(f"**Created:** {time.strftime('%Y-%m-%d %H:%M', time.localtime(created))}"
                        + (f" · trained in {float(wall) / 60:.1f} min" if isinstance(wall, (int, float)) else ""))
        if run.info.get("device") or run.info.get("profile"):
            st.markdown(f"**Device / profile:** `{run.info.get('device', '?')}` / `{run.info.get('profile', '?')}`")
    with c2:
        if run.has("images"):
            c = run.counts()
            m = st.columns(4)
            for col, (k, v) in zip(m, c.items()):
                col.metric(k, v)
    if run.status == "running":
        prog = run.progress()
        if prog:
            total = max(int(prog.get("total", 1)), 1)
            st.progress(min(int(prog.get("done", 0)) / total, 1.0),
                        text=f"{prog.get('stage', '?')}: {prog.get('done', 0)}/{total} {prog.get('message', '')}")
        st.info("This run is still training; the **Train** page shows its live progress.")
    if run.status == "failed":
        st.error(f"This run failed: {run.info.get('error') or 'see log.txt'}")

    if run.info.get("departures"):
        st.warning("This run departs from the honest protocol, so its metrics are not honest test results: "
                   + "; ".join(run.info["departures"]) + ". (`cmg audit` measures what each departure adds.)")
    st.subheader("Detection metrics (test set)")
    with guard("the metrics table"):
        table = metrics_table(run)
        if table is None or table.empty:
            st.info("No metrics yet: `metrics.json` is written when the run finishes scoring.")
        else:
            show = table[[c for c in ("auroc", "aupr", "fpr95") if c in table.columns]].rename(
                columns={"auroc": "AUROC % ↑", "aupr": "AUPR % ↑", "fpr95": "FPR@95TPR % ↓"})
            best = {"AUROC % ↑": "max", "AUPR % ↑": "max", "FPR@95TPR % ↓": "min"}
            styler = show.style.format("{:.2f}")
            for col, how in best.items():
                if col in show.columns:
                    styler = styler.highlight_max(subset=[col], color="#c7e9c0") if how == "max" else \
                        styler.highlight_min(subset=[col], color="#c7e9c0")
            left, right = st.columns([2, 3])
            left.dataframe(styler, width="stretch")
            left.caption("Best value per column highlighted. Higher is better for AUROC/AUPR, lower for FPR@95.")
            if "auroc" in table.columns:
                right.plotly_chart(plots.metrics_bar(table, "auroc"), key="home_auroc")
    with st.expander("Run configuration (config.yaml)"):
        cfg = run.config()
        st.json(cfg if cfg else {"config.yaml": "missing"}, expanded=False)
    st.caption("Pages: **Dataset** (images and captions) · **Masks** (CMER & RID) · **Latent space** · "
               "**Distance correlation** · **Ablation** (ROC, convergence) · **Upload** (score your own images) · "
               "**Train** (start a new run).")


with guard("the Overview page"):
    render()
