"""Masks (CMER & RID): each image's M masked variants, their E1 matching scores, CMER's choice l,
RID's probabilities and choice, and whether the two agree."""
from __future__ import annotations

import numpy as np
import streamlit as st

from app import plots
from app.components import captions_list, guard, require_run, require_table
from app.imaging import masked_variants, overlay_region


def _cols(df, prefix: str) -> list[str]:
    cols = [c for c in df.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def summary(df) -> None:
    agree = df["agree"].astype(bool) if "agree" in df.columns else df["cmer_label"] == df["rid_choice"]
    cols = st.columns(4)
    for col, role in zip(cols, ["train", "test"]):
        sel = df["role"] == role
        if sel.any():
            col.metric(f"RID = CMER ({role})", f"{100 * agree[sel].mean():.1f}%",
                       help="share of images where RID's predicted region equals CMER's label l")
    cols[2].metric("disagreements", int((~agree).sum()))
    m = len(_cols(df, "e1_score_"))
    if m:
        cols[3].metric("chance level", f"{100 / m:.1f}%")


def rid_history(run) -> None:
    hist = run.history() if run.has("history") else None
    if hist is None or hist.empty or "stage" not in hist.columns:
        st.info("No RID training history (history.jsonl stage `rid`) in this run.")
        return
    rid = hist[hist["stage"] == "rid"].dropna(axis=1, how="all")
    acc = [c for c in ("train_acc", "val_acc") if c in rid.columns] or [c for c in rid.columns if "acc" in c]
    if rid.empty or not acc:
        st.info("No RID accuracy per epoch recorded (history.jsonl stage `rid`).")
        return
    chance = float(rid["chance"].iloc[0]) if "chance" in rid.columns else 1.0 / max(run.n_regions, 1)
    c1, c2 = st.columns(2)
    c1.plotly_chart(plots.multi_lines(rid, acc, "RID accuracy per epoch", "accuracy", reference=chance,
                                      reference_label="chance"), key="rid_acc")
    if "loss" in rid.columns:
        c2.plotly_chart(plots.multi_lines(rid, ["loss"], "RID loss per epoch", "cross-entropy"), key="rid_loss")


def render() -> None:
    st.title("Masks: CMER & RID")
    st.caption("CMER masks each of the M grid regions in turn and keeps the variant whose E1 embedding "
               "matches the image's captions best (label l). RID learns to predict l from the image alone, "
               "so test images are masked without captions.")
    run = require_run()
    if run is None or not require_table(run, "images") or not require_table(run, "cmer"):
        return
    df = run.images().merge(run.cmer(), on="row", how="inner", suffixes=("", "_cmer"))
    e1_cols, prob_cols = _cols(df, "e1_score_"), _cols(df, "rid_prob_")
    m = len(e1_cols) or run.n_regions
    if "agree" not in df.columns and {"cmer_label", "rid_choice"} <= set(df.columns):
        df["agree"] = (df["cmer_label"] == df["rid_choice"]).astype(int)
    with guard("the agreement summary"):
        summary(df)

    f1, f2, f3, f4 = st.columns([2, 2, 2, 3])
    role = f1.radio("Role", ["all", "train", "test"], horizontal=True, key="mk_role")
    only_dis = f2.toggle("Only disagreements", key="mk_dis", help="images where RID's choice differs from CMER's l")
    classes = ["all"] + list(dict.fromkeys(df.sort_values("class_id")["class_name"]))
    cls = f3.selectbox("Class", classes, key="mk_class")
    query = f4.text_input("Search image id or row", key="mk_query", placeholder="e.g. circle_003 or 12")
    view = df
    if role != "all":
        view = view[view["role"] == role]
    if only_dis:
        view = view[view["agree"].astype(int) == 0]
    if cls != "all":
        view = view[view["class_name"] == cls]
    if query:
        q = query.strip().lower()
        hit = view["image_id"].astype(str).str.lower().str.contains(q, regex=False)
        if q.isdigit():
            hit |= view["row"] == int(q)
        view = view[hit]
    if view.empty:
        st.info("No image matches these filters.")
        return
    k = st.slider("Image", 1, len(view), 1, key="mk_idx") if len(view) > 1 else 1
    r = view.iloc[min(k, len(view)) - 1]

    label = int(r["cmer_label"]) if "cmer_label" in r else None
    choice = int(r["rid_choice"]) if "rid_choice" in r and not np.isnan(r["rid_choice"]) else None
    agree = label is not None and label == choice
    st.markdown(f"### `{r['image_id']}` · {r['class_name']} · {r['role']} · "
                f"{'anomaly' if int(r['is_anomaly']) else 'normal'} — "
                + (":green-badge[RID agrees with CMER]" if agree else ":red-badge[RID disagrees with CMER]"))

    size = run.image_size
    arr = run.image_array(r["path"], size)
    variants = masked_variants(arr, m, run.mask_mode, run.soft_value)
    if run.mask_apply == "feature":
        st.caption("This run masks in feature space (`cmer.apply`): the trunk sees the whole image and the region's "
                   "feature-map cells are left out of its pooling. The masked pictures show which region that is.")
    left, right = st.columns([1, 3])
    with left:
        st.image(arr, caption="original", width="stretch")
        if choice is not None:
            st.image(overlay_region(arr, choice, m, label="RID"), caption=f"RID's choice: region {choice}",
                     width="stretch")
        st.markdown("**Captions**")
        for c in captions_list(r.get("captions", "")):
            st.caption(f"“{c}”")
    with right:
        n_cols = m if m <= 5 else int(round(m ** 0.5))
        cols = st.columns(n_cols)
        for j, v in enumerate(variants):
            tags = []
            if j == label:
                tags.append("★ CMER l")
            if j == choice:
                tags.append("● RID")
            e1 = f"e1 {r[e1_cols[j]]:.3f}" if j < len(e1_cols) else ""
            p = f"p {r[prob_cols[j]]:.2f}" if j < len(prob_cols) else ""
            with cols[j % n_cols]:
                st.image(v, width="stretch", caption=f"mask {j} · {e1} · {p}")
                if tags:
                    st.markdown(" ".join(f":green-badge[{t}]" if t.startswith("★") else f":red-badge[{t}]"
                                         for t in tags))
        c1, c2 = st.columns(2)
        if e1_cols:
            c1.plotly_chart(plots.region_scores_bars(r[e1_cols].to_numpy(float), label,
                                                     "E1 score per masked variant (CMER: max)"),
                            key="mk_e1")
        if prob_cols:
            c2.plotly_chart(plots.probability_bars(r[prob_cols].to_numpy(float), choice, label,
                                                   "RID probabilities (red = RID's choice)"), key="mk_rid")
    st.subheader("RID training")
    with guard("the RID training curves"):
        rid_history(run)


with guard("the Masks page"):
    render()
