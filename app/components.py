"""Reusable UI pieces: the error boundary, the run summary, image grids."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from cmg_core.errors import CMGError

from .state import RunData, current_run

log = logging.getLogger("cmg.app")


@contextlib.contextmanager
def guard(what: str = "this section") -> Iterator[None]:
    """Error boundary: a library error or an unexpected exception becomes an st.error (no traceback);
    the rest of the page and the app keep working.  Streamlit's rerun/stop signals pass through
    (they are BaseException, not Exception)."""
    try:
        yield
    except CMGError as exc:
        st.error(f"{what}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the boundary is the point
        log.exception("error in %s", what)
        st.error(f"Something went wrong in {what} ({type(exc).__name__}: {exc}). "
                 "The rest of the app keeps working; the details are in the server log.")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def served_locally(address: str | None) -> bool:
    """True when the server listens on the loopback interface only (an empty address means every interface)."""
    return bool(address) and (address in LOOPBACK or address.startswith("127."))


def network_warning() -> None:
    """A warning in the sidebar when the app is served beyond this machine (server.address not loopback)."""
    address = st.get_option("server.address")
    if not served_locally(address):
        st.sidebar.warning(f"This app is served on the network (server.address={address or 'every interface'!r}): "
                           "anyone who can reach it sees the runs and can start training on this machine. "
                           "`make app` serves it on 127.0.0.1 only.", icon=":material/public:")


def require_run() -> RunData | None:
    """The selected run, or an explanation of how to get one (returns None)."""
    run = current_run()
    if run is None:
        st.info("No run selected. Train one on the **Train** page, point `CMG_RUNS_DIR` at a folder of runs, "
                "or rebuild the demo run with `make demo` (writes `assets/demo_run`).")
    return run


def require_table(run: RunData, table: str) -> bool:
    """True when the run has `table`; otherwise an st.info naming what is missing."""
    if run.has(table):
        return True
    files = {"images": "images.csv", "cmer": "cmer.csv", "scores": "scores.csv", "history": "history.jsonl"}
    st.info(f"Run **{run.name}** has no `{files.get(table, table)}` yet (status: {run.status}). "
            + ("It is still training; this page fills in when the stage that writes it finishes."
               if run.status == "running" else "It may have stopped before writing it."))
    return False


def status_badge(status: str) -> str:
    return {"done": ":green-badge[done]", "running": ":orange-badge[running]",
            "failed": ":red-badge[failed]", "partial": ":orange-badge[partial]"}.get(status, f":gray-badge[{status}]")


def run_facts(run: RunData) -> list[tuple[str, str]]:
    """(label, value) pairs describing a run, for the sidebar and the overview."""
    facts = [("Status", status_badge(run.status)), ("Dataset", f"`{run.dataset}`"),
             ("Methods", ", ".join(f"`{m}`" for m in run.methods) or "-"),
             ("Normal classes", ", ".join(run.normal_classes) or "-"),
             ("Regions M", f"{run.n_regions} ({run.mask_mode} mask, applied in {run.mask_apply} space)"),
             ("Protocol", "; ".join(f":red[{d}]" for d in departures) if (departures := run.info.get("departures"))
              else "honest")]
    if run.has("images"):
        c = run.counts()
        facts.append(("Images", f"{c['train']} train · {c['test normal']} test normal · {c['test anomaly']} test anomaly"))
    return facts


def sidebar_summary(run: RunData) -> None:
    with st.sidebar.container(border=True):
        for label, value in run_facts(run):
            st.markdown(f"**{label}:** {value}")
        if run.status == "failed" and run.info.get("error"):
            st.error(f"Run failed: {run.info['error']}")
        st.caption(f"`{run.path}`")


def captions_list(captions: str) -> list[str]:
    return [c.strip() for c in str(captions or "").split(" | ") if c.strip()]


def image_grid(run: RunData, df: pd.DataFrame, n_cols: int = 6, size: int = 128, show_captions: int = 1,
               extra: dict[int, str] | None = None) -> None:
    """A grid of images (rows of images.csv) with class, role and the first captions under each."""
    cols = st.columns(n_cols)
    for k, (_, r) in enumerate(df.iterrows()):
        with cols[k % n_cols]:
            try:
                arr = run.image_array(r["path"], size)
                st.image(arr, width="stretch")
            except CMGError as exc:
                st.warning(f"{r.get('image_id', '?')}: {exc}")
                continue
            kind = "anomaly" if int(r.get("is_anomaly", 0)) else "normal"
            st.markdown(f"**{r.get('class_name', '?')}** · {r.get('role', '?')} · "
                        f"{':red[' + kind + ']' if kind == 'anomaly' else kind}")
            if extra and int(r["row"]) in extra:
                st.caption(extra[int(r["row"])])
            caps = captions_list(r.get("captions", ""))
            for c in caps[:show_captions]:
                st.caption(f"“{c}”")


def thumbnails(run: RunData, df: pd.DataFrame, n_cols: int = 8, size: int = 96, limit: int = 48,
               label_col: str | None = None) -> None:
    """Compact grid of small images (e.g. a latent-space selection)."""
    if len(df) > limit:
        st.caption(f"showing {limit} of {len(df)} selected images")
        df = df.head(limit)
    cols = st.columns(n_cols)
    for k, (_, r) in enumerate(df.iterrows()):
        with cols[k % n_cols]:
            try:
                st.image(run.image_array(r["path"], size), width="stretch")
            except CMGError as exc:
                st.caption(f"unreadable: {exc}")
                continue
            label = f"{r.get('class_name', '')} · {'anomaly' if int(r.get('is_anomaly', 0)) else 'normal'}"
            if label_col and label_col in r:
                label += f" · {r[label_col]}"
            st.caption(label)


def to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(arr, dtype=np.uint8))


def multiline_code(text: str, empty: str = "(empty)") -> None:
    st.code(text or empty, language=None)


def select_methods(run: RunData, label: str, default: Sequence[str] | None = None, key: str | None = None) -> list[str]:
    methods = run.scored_methods() or run.methods
    default = [m for m in (default or methods) if m in methods]
    return st.multiselect(label, methods, default=default, key=key)
