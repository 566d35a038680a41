"""The Latent page's defaults and its on-demand maps.

`default_pair(methods)`: the two methods the page opens on (SSD vs CMG whenever the run has both).
`embedded(...)`: a 2-D map of a method's E2 features for a run folder without stored maps
(analysis/latent.json), computed once by `cmg_core.analysis.cached_latent_map` and kept in the user cache
($CMG_CACHE_DIR/latent, keyed by the embeddings' content and the map settings): the run folder is never written.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from app.state import RunData
from cmg_core.errors import ConfigError
from cmg_core.methods import parse_method

MAX_POINTS = 2500  # larger runs are subsampled (seeded) for the on-demand embedding
SEED = 0  # of the on-demand maps and their subsample
PAIR = ("ssd", "cmg")  # base methods the page opens on, left and right


def base_method(name: str) -> str:
    """'cmg[supcon]' -> 'cmg'; a name this version does not know -> the part before any '['."""
    try:
        return parse_method(name).base
    except ConfigError:
        return str(name).split("[")[0]


def default_pair(methods: list[str]) -> tuple[str, str]:
    """(left, right) the Latent page opens on: the run's first SSD and first CMG method (any CMLE reading:
    `cmg`, `cmg[lle]`, `cmg[supcon]`); when it lacks one, the one it has and the next method of the run's order;
    a run of one method shows it on both sides."""
    if not methods:
        raise ValueError("default_pair needs at least one method")
    bases = [base_method(m) for m in methods]
    chosen = [methods[bases.index(b)] for b in PAIR if b in bases]
    chosen += [m for m in methods if m not in chosen][: max(0, 2 - len(chosen))]
    return (chosen[0], chosen[1] if len(chosen) > 1 else chosen[0])


@st.cache_data(show_spinner=False, max_entries=32)
def embedded(run_path: str, method: str, algo: str, token: int,
             max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rows, coords, from_disk_cache) of the `algo` map of a method's E2 features (token: the embeddings file's
    modification time, so a rewritten file is read again; the disk cache is keyed by its content)."""
    from cmg_core.analysis import cached_latent_map

    X = RunData(run_path).embeddings(method)
    return cached_latent_map(X, algo, seed=SEED, max_points=max_points)
