"""Latent space: 2-D maps (t-SNE / UMAP) of the E2 features of two methods side by side, with selection."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import plots
from app.components import guard, require_run, require_table, thumbnails
from app.latent_maps import MAX_POINTS, SEED, default_pair, embedded
from app.state import RunData, file_token, score_column
from cmg_core.errors import DataError
from cmg_core.runs import method_slug

SEL_KEY = "latent_selected_rows"


def precomputed(run: RunData, method: str, algo: str, n_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, coords) from analysis/latent.json when it has this method and algorithm.

    Accepted: {method: {algo: [[x, y], ...]}} or {"methods": {...}} (aligned with images.csv rows), each
    optionally with "rows": [...] when only some rows were embedded."""
    data = run.analysis("latent")
    if not isinstance(data, dict):
        return None
    src = data.get("methods", data)
    entry = src.get(method) or src.get(method_slug(method))
    if not isinstance(entry, dict) or algo not in entry:
        return None
    coords = np.asarray(entry[algo], dtype=np.float64)
    rows = np.asarray(entry.get("rows", data.get("rows", np.arange(len(coords)))), dtype=int)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(rows) != len(coords) or (rows >= n_rows).any():
        return None
    return rows, coords


def coordinates(run: RunData, method: str, algo: str, n_rows: int) -> tuple[np.ndarray, np.ndarray, str]:
    pre = precomputed(run, method, algo, n_rows)
    if pre is not None:
        return pre[0], pre[1], "precomputed (analysis/latent.json)"
    p = run.path / "embeddings" / f"{method_slug(method)}.npy"
    if not p.is_file():
        raise DataError(f"run {run.name!r} has no embeddings for {method!r} (embeddings/{p.name}) and no "
                        "precomputed latent map")
    label = {"tsne": "t-SNE", "umap": "UMAP"}[algo]
    with st.status(f"Computing the {label} map of `{method}` features ...", expanded=False) as status:
        rows, coords, cached = embedded(str(run.path), method, algo, file_token(p), MAX_POINTS)
        status.update(label=f"{label} of `{method}`: {len(rows)} points", state="complete")
    return rows, coords, (f"computed here ({label}, seed {SEED}; " + ("read from the app's cache)" if cached else
                                                                       "kept in the app's cache)"))


def selected_rows(event) -> list[int]:
    """images.csv rows of the points in a plotly selection event (each point's customdata is [row])."""
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    rows = []
    for p in points:
        cd = p.get("customdata")
        if isinstance(cd, dict):  # a typed-array cell arrives as {"0": value}
            cd = next(iter(cd.values()), None)
        if isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        try:
            rows.append(int(cd))
        except (TypeError, ValueError):
            continue
    return sorted(set(rows))


def _on_select(chart_key: str) -> None:
    try:
        st.session_state[SEL_KEY] = selected_rows(st.session_state.get(chart_key))
    except Exception:  # noqa: BLE001 - a malformed event must not break the page
        st.session_state[SEL_KEY] = []


def render() -> None:
    st.title("Latent space")
    st.caption("2-D maps of the detector features (E2) of two methods. CMLE should give the CMG map the "
               "neighbourhood structure of the captions. Box- or lasso-select (or click) points to see the images; "
               "the rest are greyed out, not hidden.")
    run = require_run()
    if run is None or not require_table(run, "images"):
        return
    methods = run.methods
    if not methods:
        st.info("This run lists no methods.")
        return
    c1, c2, c3, c4, c5 = st.columns([2, 2, 2, 3, 2])
    left_default, right_default = default_pair(methods)
    left = c1.selectbox("Left", methods, index=methods.index(left_default), key="lat_left")
    right = c2.selectbox("Right", methods, index=methods.index(right_default), key="lat_right")
    algo_label = c3.radio("Map", ["t-SNE", "UMAP"], horizontal=True, key="lat_algo")
    algo = "tsne" if algo_label == "t-SNE" else "umap"
    color = c4.radio("Colour by", ["class", "normal / anomaly", "score"], horizontal=True, key="lat_color")
    role = c5.radio("Images", ["all", "test", "train"], horizontal=True, key="lat_role")

    df = run.joined()
    selected = st.session_state.get(SEL_KEY, [])
    cols = st.columns(2)
    for col, method, side in zip(cols, (left, right), ("left", "right")):
        with col, guard(f"the {method} map"):
            rows, coords, source = coordinates(run, method, algo, len(df))
            sub = df.set_index("row").loc[rows]
            keep = np.ones(len(rows), bool) if role == "all" else (sub["role"] == role).to_numpy()
            rows, coords, sub = rows[keep], coords[keep], sub[keep]
            scol = score_column(sub.columns, method)
            if color == "class":
                values, kind, ctitle = sub["class_name"].to_numpy(), "category", "class"
            elif color == "normal / anomaly":
                values = np.where(sub["is_anomaly"].to_numpy() == 1, "anomaly", "normal")
                kind, ctitle = "category", ""
            else:
                if scol is None:
                    raise DataError(f"scores.csv has no score column for {method!r}")
                values, kind, ctitle = sub[scol].to_numpy(float), "continuous", "score"
            hover = [f"<b>{iid}</b><br>{c} · {r} · {'anomaly' if a else 'normal'}"
                     + (f"<br>score {s:.3f}" if scol else "")
                     for iid, c, r, a, s in zip(sub["image_id"], sub["class_name"], sub["role"], sub["is_anomaly"],
                                                 sub[scol] if scol else np.zeros(len(sub)))]
            fig = plots.latent_scatter(coords, rows, values, kind, hover, selected or None,
                                       title=f"{method} ({algo_label})", color_title=ctitle)
            key = f"lat_chart_{side}"
            st.plotly_chart(fig, key=key, on_select=lambda k=key: _on_select(k),
                            selection_mode=("points", "box", "lasso"))
            st.caption(f"{len(rows)} points · {source}")

    st.subheader(f"Selected images ({len(selected)})")
    if not selected:
        st.info("Select points on either map (box, lasso or click) to see their images here.")
        return
    if st.button("Clear selection", key="lat_clear"):
        st.session_state[SEL_KEY] = []
        st.rerun()
    picked = df[df["row"].isin(selected)]
    with guard("the selected images"):
        thumbnails(run, picked, n_cols=8, size=96)
        show = [c for c in ["row", "image_id", "class_name", "role", "is_anomaly"] if c in picked.columns]
        show += [c for c in picked.columns if c.startswith("score_")]
        st.dataframe(pd.DataFrame(picked[show]), hide_index=True, width="stretch")


with guard("the Latent space page"):
    render()
