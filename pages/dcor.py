"""Distance correlation (paper Fig. 5): how much of the raw image survives CMER's masking, next to noise."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import plots
from app.components import guard, require_run, require_table
from app.imaging import masked_image
from app.state import RunData, file_token
from cmg_core.errors import DataError


def from_analysis(data, key: str = "matrix") -> pd.DataFrame:
    """analysis/dcor.json {"names": [...], "matrix": [[...]], "matrix_bias_corrected": ...} -> DataFrame."""
    names, mat = data.get("names"), np.asarray(data.get(key), dtype=float)
    if not names or mat.shape != (len(names), len(names)):
        raise DataError(f"analysis/dcor.json has {len(names or [])} names but a matrix of shape {mat.shape}")
    return pd.DataFrame(mat, index=names, columns=names)


@st.cache_data(show_spinner=False, max_entries=16)
def compute_dcor(run_path: str, n: int, size: int, seed: int, token: int, bias_corrected: bool = False) -> pd.DataFrame:
    """dcor_matrix of n sampled images: raw, CMER-masked (mask from cmer.csv), white noise, uniform noise.
    Pixels are flattened (images resized to size x size)."""
    from cmg_core.analysis import dcor_matrix

    run = RunData(run_path)
    df = run.images().merge(run.cmer()[["row", "cmer_label"]], on="row")
    rng = np.random.default_rng(seed)
    pick = df.iloc[np.sort(rng.choice(len(df), size=min(n, len(df)), replace=False))]
    raw, masked = [], []
    for _, r in pick.iterrows():
        arr = run.image_array(r["path"], size)
        raw.append(arr.astype(np.float32).ravel() / 255.0)
        masked.append(masked_image(arr, int(r["cmer_label"]), run.n_regions, run.mask_mode,
                                   run.soft_value).astype(np.float32).ravel() / 255.0)
    raw_a = np.stack(raw)
    arrays = {"raw images": raw_a, "CMER-masked images": np.stack(masked),
              "white noise": rng.normal(size=raw_a.shape).astype(np.float32),
              "uniform noise": rng.uniform(size=raw_a.shape).astype(np.float32)}
    return dcor_matrix(arrays, bias_corrected=bias_corrected)


def render() -> None:
    st.title("Distance correlation")
    st.caption("Paper Fig. 5: distance correlation (dCor) between raw images, CMER-masked images and two noise "
               "baselines. A masked image that keeps most of dCor with the raw image lost only redundant content.")
    run = require_run()
    if run is None:
        return
    data = run.analysis("dcor")
    if data:
        corrected = False
        if data.get("matrix_bias_corrected") is not None:
            corrected = st.toggle("Bias-corrected dCor²", key="dc_pre_bc",
                                  help="Plain dCor (the paper's statistic) tends to 1 for any pair of "
                                       "high-dimensional vectors when the sample is small; the bias-corrected "
                                       "squared statistic does not.")
        key = "matrix_bias_corrected" if corrected else "matrix"
        what = "Bias-corrected dCor²" if corrected else "Distance correlation"
        n = f", {data['n_images']} images" if data.get("n_images") else ""
        st.plotly_chart(plots.dcor_heatmap(from_analysis(data, key), f"{what} (analysis/dcor.json{n})"),
                        key="dcor_pre")
        st.caption("Precomputed by `cmg experiment` (analysis/dcor.json).")
        return
    st.info("This run has no precomputed `analysis/dcor.json` (written by `cmg experiment`). "
            "Compute it here on a small sample of images instead.")
    if not require_table(run, "images") or not require_table(run, "cmer"):
        return
    n_images = len(run.images())
    c1, c2, c3, c4 = st.columns(4)
    n = c1.slider("Images in the sample", 8, max(8, min(256, n_images)), min(64, max(8, n_images)), key="dc_n")
    size = c2.select_slider("Resize to (pixels per side)", [32, 48, 64, 96, 128], value=64, key="dc_size")
    seed = int(c3.number_input("Seed", 0, 10_000, 0, key="dc_seed"))
    corrected = c4.toggle("Bias-corrected dCor²", key="dc_bc",
                          help="Plain dCor (the paper's statistic) tends to 1 for any pair of high-dimensional "
                               "vectors when the sample is small; the bias-corrected squared statistic "
                               "(dcor.u_distance_correlation_sqr) does not.")
    key = (str(run.path), n, size, seed, corrected)
    if st.button("Compute distance correlation", type="primary", key="dc_go"):
        st.session_state["dcor_request"] = key
    if st.session_state.get("dcor_request") != key:
        return
    with st.status(f"Computing dCor on {min(n, n_images)} images ...", expanded=False) as status:
        mat = compute_dcor(str(run.path), n, size, seed, file_token(run.path / "cmer.csv"), corrected)
        status.update(label="Distance correlation computed", state="complete")
    what = "Bias-corrected dCor²" if corrected else "Distance correlation"
    st.plotly_chart(plots.dcor_heatmap(mat, f"{what} ({min(n, n_images)} images, {size}px)"), key="dcor_live")
    if not corrected:
        st.caption("With flattened pixels and a small sample, plain dCor is close to 1 even against noise; "
                   "switch on the bias-corrected statistic to see the contrast.")
    st.dataframe(mat.style.format("{:.3f}"), width="stretch")


with guard("the Distance correlation page"):
    render()
