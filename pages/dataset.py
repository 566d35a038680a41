"""Dataset: the run's images with their captions, filtered by class, normal/anomaly and train/test role."""
from __future__ import annotations

import math

import streamlit as st

from app.components import captions_list, guard, image_grid, require_run, require_table

PER_PAGE = 24


def render() -> None:
    st.title("Dataset")
    run = require_run()
    if run is None or not require_table(run, "images"):
        return
    df = run.images()
    normal = set(run.normal_classes)
    st.caption(f"Dataset `{run.dataset}` · {len(df)} images of this task · normal classes: "
               f"{', '.join(sorted(normal)) or '-'}. Captions come from images.csv.")

    f1, f2, f3, f4 = st.columns([3, 2, 2, 2])
    classes = list(dict.fromkeys(df.sort_values("class_id")["class_name"]))
    picked = f1.multiselect("Classes", classes, default=[], placeholder="all classes", key="ds_classes")
    kind = f2.radio("Normal / anomaly", ["all", "normal", "anomaly"], horizontal=True, key="ds_kind")
    role = f3.radio("Role", ["all", "train", "test"], horizontal=True, key="ds_role")
    query = f4.text_input("Search captions / id", key="ds_query", placeholder="e.g. red")

    view = df
    if picked:
        view = view[view["class_name"].isin(picked)]
    if kind != "all":
        view = view[view["is_anomaly"] == (1 if kind == "anomaly" else 0)]
    if role != "all":
        view = view[view["role"] == role]
    if query:
        q = query.lower()
        view = view[view["captions"].str.lower().str.contains(q, regex=False)
                    | view["image_id"].astype(str).str.lower().str.contains(q, regex=False)]

    counts = view.groupby(["role", "is_anomaly"]).size()
    summary = ", ".join(f"{n} {r} {'anomaly' if a else 'normal'}" for (r, a), n in counts.items())
    st.markdown(f"**{len(view)} images** match" + (f" ({summary})" if summary else ""))
    if view.empty:
        st.info("No image matches these filters.")
        return

    grid_tab, table_tab = st.tabs(["Image grid", "Table (all captions)"])
    with grid_tab:
        pages = max(1, math.ceil(len(view) / PER_PAGE))
        c1, c2 = st.columns([1, 3])
        page = c1.number_input(f"Page (of {pages})", 1, pages, 1, key="ds_page") if pages > 1 else 1
        n_caps = c2.slider("Captions shown per image", 0, 5, 1, key="ds_ncaps")
        chunk = view.iloc[(page - 1) * PER_PAGE: page * PER_PAGE]
        with guard("the image grid"):
            image_grid(run, chunk, n_cols=6, size=128, show_captions=n_caps)
    with table_tab:
        t = view[["row", "image_id", "class_name", "role", "is_anomaly", "captions"]].copy()
        t["captions"] = t["captions"].map(lambda s: "\n".join(captions_list(s)))
        st.dataframe(t, hide_index=True, width="stretch", height=420)


with guard("the Dataset page"):
    render()
