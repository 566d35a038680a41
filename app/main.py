"""CMG analysis app: `python -m app` (`make app`; or `streamlit run app/main.py`) from the repository root.

The frame: the run picker and run summary in the sidebar, and the page navigation (pages/ holds one file
per page).  Runs are found under `runs/` ($CMG_RUNS_DIR overrides) plus the demo run `assets/demo_run`.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from app import state  # noqa: E402
from app.components import guard, network_warning, sidebar_summary  # noqa: E402

PAGES = REPO / "pages"

st.set_page_config(page_title="CMG · language-guided anomaly detection", page_icon=":material/search:", layout="wide")


def run_picker() -> None:
    runs = state.discover_runs()
    st.sidebar.title("CMG")
    st.sidebar.caption("Vision anomaly detection guided by language")
    if not runs:
        st.sidebar.info(f"No runs found in `{state.runs_root()}` and no demo run at `assets/demo_run`.")
        state.set_current(None)
        return
    options = [str(r.path) for r in runs]
    labels = {str(r.path): state.run_label(r) for r in runs}
    current = st.session_state.get(state.RUN_KEY)
    if current not in options:
        st.session_state.pop(state.RUN_KEY, None)
        default = state.default_run(runs)
        st.session_state[state.RUN_KEY] = str(default.path) if default else options[0]
    path = st.sidebar.selectbox("Run", options, format_func=lambda p: labels.get(p, p), key=state.RUN_KEY,
                                help="Runs under the runs folder (CMG_RUNS_DIR) and the demo run, newest first.")
    state.set_current(path)
    with guard("the run summary"):
        sidebar_summary(state.RunData(path))


with guard("the run picker"):
    network_warning()
    run_picker()

nav = st.navigation({
    "Results": [
        st.Page(PAGES / "home.py", title="Overview", icon=":material/home:", default=True),
        st.Page(PAGES / "dataset.py", title="Dataset", icon=":material/photo_library:", url_path="dataset"),
        st.Page(PAGES / "masks.py", title="Masks (CMER & RID)", icon=":material/grid_view:", url_path="masks"),
        st.Page(PAGES / "latent.py", title="Latent space", icon=":material/scatter_plot:", url_path="latent"),
        st.Page(PAGES / "dcor.py", title="Distance correlation", icon=":material/grid_on:", url_path="dcor"),
        st.Page(PAGES / "ablation.py", title="Ablation", icon=":material/show_chart:", url_path="ablation"),
        st.Page(PAGES / "reproduction.py", title="Reproduction", icon=":material/fact_check:",
                url_path="reproduction"),
    ],
    "Use": [
        st.Page(PAGES / "upload.py", title="Upload", icon=":material/upload:", url_path="upload"),
        st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:", url_path="train"),
    ],
})
nav.run()
