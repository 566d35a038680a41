"""Reproduction: where the paper's CMG 99.71 comes from. The audit table (`cmg audit`) beside the paper's
numbers, Fig.10 per protocol, and for a test image how RID's mask differs from the caption-guided one."""
from __future__ import annotations

import streamlit as st

from app import state
from app.components import guard
from app.imaging import overlay_region
from cmg_core.audit_report import FIG10_METHODS, audit_summary, audit_table, fig10_figure, read_audit


def audit_section(folder) -> None:
    per_task, fig10 = read_audit(folder)
    s = audit_summary(per_task)
    seeds = sorted(per_task.seed.unique().tolist())
    st.markdown(f"Tasks with seeds {seeds}. Mean ± 95 % CI over tasks of the test AUROC (Mahalanobis score); in "
                "brackets the change against the honest row. **Every row but the first uses test data in a way "
                "an honest evaluation does not** (test captions, test labels, or test-set model selection).")
    tab1, tab2 = st.tabs(["Reported AUROC", "After the first epoch"])
    tab1.dataframe(audit_table(s), width="stretch")
    tab2.dataframe(audit_table(s, "epoch1", delta=False), width="stretch")
    top = s[s.method == "cmg[supcon]"].sort_values("reported", ascending=False).head(1)
    if len(top):
        r = top.iloc[0]
        st.info(f"Highest CMG[supcon] value reached: **{r.reported:.2f} ± {r.reported_ci95:.2f}** (row `{r.row}`); "
                "the paper reports 99.71 ± 0.21.")
    st.subheader("Fig.10: test AUROC per epoch")
    rows = list(fig10.get("rows", {}))
    if not rows:
        st.info("This audit has no per-epoch curves (fig10.json).")
        return
    pick = st.selectbox("Protocol row", rows, index=len(rows) - 1, key="rep_row")
    methods = st.multiselect("Methods", list(fig10["rows"][pick]), default=[m for m in FIG10_METHODS
                                                                           if m in fig10["rows"][pick]],
                             key="rep_methods")
    st.plotly_chart(fig10_figure(fig10["rows"][pick], methods, title=pick), key="rep_fig10")


def mask_section(folder) -> None:
    """A test image under RID's mask (the honest rule) and under CMER's caption-guided mask (test_captions)."""
    runs = sorted(p for p in folder.glob("task_seed*") if "__" not in p.name and (p / "cmer.csv").is_file())
    if not runs:
        st.info("No honest run with cmer.csv in this audit folder yet.")
        return
    run = state.RunData(st.selectbox("Task", runs, format_func=lambda p: p.name, key="rep_task"))
    df = run.images().merge(run.cmer(), on="row", suffixes=("", "_cmer"))
    test = df[df.role == "test"]
    differ = test[test.cmer_label != test.rid_choice]
    c1, c2, c3 = st.columns(3)
    c1.metric("test images where RID ≠ caption-guided", f"{100 * len(differ) / max(len(test), 1):.1f}%")
    for col, flag, name in ((c2, 0, "normal"), (c3, 1, "anomalies")):
        g = test[test.is_anomaly == flag]
        col.metric(f"RID = CMER on {name}", f"{100 * (g.cmer_label == g.rid_choice).mean():.1f}%" if len(g) else "-")
    pool = differ if st.toggle("Only images where they differ", value=True, key="rep_differ") else test
    if pool.empty:
        st.info("No test image to show.")
        return
    k = st.slider("Image", 1, len(pool), 1, key="rep_img") if len(pool) > 1 else 1
    r = pool.iloc[k - 1]
    arr = run.image_array(r["path"], run.image_size)
    m = run.n_regions
    st.markdown(f"`{r['image_id']}` · {r['class_name']} · {'anomaly' if int(r['is_anomaly']) else 'normal'}")
    a, b = st.columns(2)
    a.image(overlay_region(arr, int(r["rid_choice"]), m, label="RID"), width="stretch",
            caption=f"honest: RID's choice, region {int(r['rid_choice'])} (no captions read)")
    b.image(overlay_region(arr, int(r["cmer_label"]), m, label="CMER"), width="stretch",
            caption=f"departure: CMER with the image's own captions, region {int(r['cmer_label'])}")


def render() -> None:
    st.title("Reproduction")
    st.caption("How does the paper get CMG 99.71 on UCM? `cmg audit --config CONFIG` runs the honest protocol, then "
               "each departure of the authors' released code alone and cumulatively.")
    folders = state.audit_folders()
    if not folders:
        st.info("No audit yet. Run `cmg audit --config configs/ucm_captions_scratch.yaml` (writes "
                "`experiments/ucm_captions_scratch_audit/`), then reload this page.")
        return
    folder = st.selectbox("Audit", folders, format_func=lambda p: p.name, key="rep_folder")
    with guard("the audit table"):
        audit_section(folder)
    st.subheader("Masks: RID vs caption-guided")
    with guard("the mask comparison"):
        mask_section(folder)


with guard("the Reproduction page"):
    render()
