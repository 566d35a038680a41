"""Upload: score your own images with the selected run (RID mask, CMG and SSD anomaly scores)."""
from __future__ import annotations

import streamlit as st

from app import plots
from app.components import guard, require_run
from cmg_core.errors import CMGError
from app.state import get_predictor
from app.tables import train_scores
from app.uploads import (MAX_FILES, UploadCache, UploadResult, chosen_overlay, digest, process_one, rid_of,
                         report_png_bytes, results_csv, threshold_of, verdict)

CACHE_KEY = "upload_results"


def show_result(run, r: UploadResult, focus: list[str], key: str) -> None:
    with st.container(border=True):
        st.markdown(f"#### {r.name}")
        for note in r.notes:
            st.info(note)
        if not r.ok:
            st.error(r.error or "this file could not be processed")
            return
        res = r.result
        k, probs = rid_of(res)
        c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
        c1.image(r.image, caption=f"uploaded ({r.image.width}x{r.image.height})", width="stretch")
        if k >= 0:
            c2.image(chosen_overlay(r, run.n_regions), caption=f"RID's chosen region: {k}", width="stretch")
        else:
            c2.caption("No masks: this run's methods do not use RID.")
        if res.get("masked_image") is not None:
            c3.image(res["masked_image"], caption="masked image (E2 input)", width="stretch")
        if len(probs):
            c4.plotly_chart(plots.probability_bars(probs, k, title="RID probabilities per region"),
                            key=f"{key}_probs")
        words = res.get("language")
        if words:
            st.markdown("**In words** (the image placed in the caption space): nearest normal training captions "
                        + "; ".join(f"*{c}* ({s:.2f})" for c, s in words["captions"]))
            k, sim, example = words["cluster"]
            st.caption("Closest dictionary words: " + ", ".join(f"{w} ({s:.2f})" for w, s in words["words"])
                       + f". Nearest caption cluster: {k} (similarity {sim:.2f}; e.g. *{example}*).")
        scores = res.get("scores") or {}
        shown = [m for m in focus if m in scores] or list(scores)[:2]
        cols = st.columns(max(len(shown), 1))
        for col, m in zip(cols, shown):
            with col:
                s = float(scores[m])
                tr = None
                with guard(f"the {m} training-score histogram"):
                    tr = train_scores(run, m) if run.has("scores") else None
                thr = threshold_of(res, m, tr)
                pct = (res.get("percentiles") or {}).get(m)
                v = verdict(s, thr)
                st.metric(f"{m.upper()} score", f"{s:.3f}",
                          delta=f"{pct:.1f}th percentile" if pct is not None else None,
                          delta_color="inverse" if v == "anomalous" else "off")
                meaning = (res.get("threshold_meaning") or {}).get(m, "threshold: 95th percentile of the normal "
                                                                       "training scores (uncalibrated)")
                st.markdown(f"Verdict: {':red-badge[anomalous]' if v == 'anomalous' else ':green-badge[' + v + ']'}"
                            + (f" at threshold {thr:.3f}" if thr is not None else ""))
                st.caption(meaning)
                if tr is not None and len(tr):
                    st.plotly_chart(plots.score_histogram(tr, thr, s, f"{m}: normal training scores"),
                                    key=f"{key}_hist_{m}")
        others = [m for m in scores if m not in shown]
        if others:
            st.caption("Other methods: " + ", ".join(
                f"{m} {float(scores[m]):.3f} ({verdict(float(scores[m]), threshold_of(res, m, None))})" for m in others))
        with guard("the PNG report"):
            st.download_button("Download this result (PNG)", report_png_bytes(r, run.n_regions),
                               file_name=f"cmg_{r.name.rsplit('.', 1)[0]}.png", mime="image/png",
                               key=f"{key}_png", on_click="ignore")


def render() -> None:
    st.title("Upload images")
    st.caption("Score your own images with the selected run: RID picks the region to mask (no captions "
               "needed), then each detector scores the masked image. Scores are placed among the normal training images' "
               "out-of-fold scores; the verdict's threshold is calibrated so that about 5 % of normal images "
               "(`detector.fpr`) are flagged.")
    run = require_run()
    if run is None:
        return
    options = run.scored_methods() or run.methods  # `cmg`, `cmg@knn` (its k-NN score), ...
    focus_default = [m for m in ("cmg", "ssd") if m in options] or options[:2]
    focus = st.multiselect("Methods to show in detail", options, default=focus_default, key="up_methods")
    files = st.file_uploader("Images (PNG, JPEG, TIFF, BMP, WebP; several at once)", type=None,
                             accept_multiple_files=True, key="up_files")
    if not files:
        st.info("Upload one or more images to score them.")
        return
    if len(files) > MAX_FILES:
        st.warning(f"{len(files)} files uploaded: the first {MAX_FILES} are scored; upload the others in another "
                   "batch.")
        files = files[:MAX_FILES]
    cache: UploadCache = st.session_state.setdefault(CACHE_KEY, UploadCache())
    todo = []
    for f in files:
        data = f.getvalue()
        todo.append((f.name, data, (str(run.path), f.name, digest(data))))
    cache.keep(ck for _, _, ck in todo)  # results of files no longer uploaded are dropped
    fresh: dict = {}
    missing = [t for t in todo if t[2] not in cache]
    if missing:
        predictor, load_error = None, None
        try:
            with st.spinner("Loading the run's models ..."):
                predictor = get_predictor(run)
        except CMGError as exc:
            load_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported per file below; the page keeps working
            load_error = f"{type(exc).__name__}: {exc}"
        if load_error:
            st.error(f"Could not load the models of run {run.name!r}: {load_error}")
        bar = st.progress(0.0, text="scoring ...")
        for i, (name, data, ck) in enumerate(missing):
            bar.progress(i / len(missing), text=f"scoring {name} ({i + 1}/{len(missing)})")
            r = process_one(name, data, predictor)
            if predictor is None and r.image is not None:
                r.error = f"{name}: not scored because the run's models could not be loaded ({load_error})"
                fresh[ck] = r  # not cached: a later rerun retries
            else:
                cache.put(ck, r)
        bar.empty()
    results = [cache.get(ck) or fresh[ck] for _, _, ck in todo]
    ok = sum(r.ok for r in results)
    st.markdown(f"**{ok} of {len(results)} file(s) scored**" + (f", {len(results) - ok} rejected" if ok < len(results) else ""))
    st.download_button("Download all results (CSV)", results_csv(results), file_name="cmg_upload_results.csv",
                       mime="text/csv", key="up_csv", on_click="ignore")
    for i, r in enumerate(results):
        with guard(f"the result of {r.name}"):
            show_result(run, r, focus, key=f"up_{i}")


with guard("the Upload page"):
    render()
