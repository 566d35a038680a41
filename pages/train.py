"""Train: configure and start a run in the background, and follow it live (survives page reloads)."""
from __future__ import annotations

import time

import streamlit as st

from app import state, training
from app.components import guard
from cmg_core.errors import CMGError
from cmg_core.methods import REGISTRY, method_label

WATCH_KEY = "train_seen_states"


PROFILE_HELP = ("frozen: a frozen pretrained trunk, features cached once, small trained heads (fast on a CPU). "
                "end2end: E2 is an encoder trained on the images from scratch (the paper's regime; a GPU, or a "
                "small CNN at 32 px on a CPU); E1 stays a head on the frozen trunk unless the config says otherwise.")


def _defaults(config):
    try:
        return training.validate(config, [])
    except CMGError as exc:
        from cmg_core.config import RunConfig

        st.warning(f"{config.name} could not be read ({exc}); showing the built-in defaults.")
        return RunConfig()


def _class_choices(dataset: str) -> list[str] | None:
    if dataset == "synthetic":
        from cmg_core.data.synthetic import CLASSES

        return list(CLASSES)
    return None


def config_form() -> None:
    from cmg_core.data import dataset_names

    st.subheader("Configure a run")
    files = training.config_files()
    default = files.index(training.DEFAULT_CONFIG) if training.DEFAULT_CONFIG in files else 0
    p1, p2 = st.columns([2, 1])
    config = p1.selectbox("Config file (every other setting comes from it)", files, index=default,
                          format_func=lambda f: f"configs/{f.name}", key="tr_config")
    cfg = _defaults(config)
    tag = config.stem  # widgets below take their defaults from the chosen config
    profiles = ["frozen", "end2end"]
    profile = p2.radio("Profile", profiles, index=profiles.index(cfg.model.profile), horizontal=True,
                       key=f"tr_profile_{tag}", help=PROFILE_HELP)
    datasets = dataset_names()
    c1, c2 = st.columns(2)
    dataset = c1.selectbox("Dataset", datasets, index=datasets.index(cfg.data.name) if cfg.data.name in datasets else 0,
                           key=f"tr_dataset_{tag}")
    root = c2.text_input("Dataset folder or packed file (all but synthetic)", value=cfg.data.root or "",
                         key=f"tr_root_{tag}", disabled=dataset == "synthetic", placeholder="/path/to/dataset")
    with st.form("train_form", border=True):
        name = st.text_input("Run name", value=f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}", key="tr_name")
        choices = _class_choices(dataset)
        t1, t2 = st.columns([3, 1])
        if choices:
            default_normal = [c for c in (cfg.task.normal_classes or []) if c in choices] if dataset == cfg.data.name else []
            normal = t1.multiselect("Normal classes (the rest are anomalies)", choices, default=default_normal,
                                    key="tr_normal")
        else:
            raw = t1.text_input("Normal classes (comma-separated names or ids; empty = draw at random)",
                                key="tr_normal_text")
            normal = [c.strip() for c in raw.split(",") if c.strip()]
        n_normal = t2.number_input("…or draw this many", 0, 50, 0, key="tr_n_normal",
                                   help="used when no normal class is given")
        defaults = [method_label(m, cfg.cmle.loss) for m in cfg.train.methods]
        methods = st.multiselect("Methods (CMLE readings: [lle] the paper's Eq.9-13, [supcon] the released code)",
                                 list(training.METHOD_CHOICES), default=[m for m in defaults
                                                                         if m in training.METHOD_CHOICES],
                                 help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()),
                                 key="tr_methods")
        e1, e2, e3, e4, e5, e6 = st.columns(6)
        e1_ep = e1.number_input("E1 epochs", 1, 1000, int(cfg.e1.epochs), key="tr_e1")
        rid_ep = e2.number_input("RID epochs", 1, 1000, int(cfg.cmer.rid_epochs), key="tr_rid")
        e2_ep = e3.number_input("E2 epochs", 1, 1000, int(cfg.e2.epochs), key="tr_e2")
        m = e4.selectbox("Regions M", [4, 9, 16], index=[4, 9, 16].index(cfg.cmer.n_regions)
                         if cfg.cmer.n_regions in (4, 9, 16) else 0, key="tr_m")
        seed = e5.number_input("Seed", 0, 1_000_000, int(cfg.train.seed), key="tr_seed")
        device = e6.selectbox("Device", ["auto", "cpu", "cuda"], key="tr_device")
        submitted = st.form_submit_button("Start training", type="primary")
    if not submitted:
        return
    out_dir = state.runs_root()
    overrides = training.build_overrides(
        name=name.strip(), out_dir=out_dir, dataset=dataset, root=root.strip() or None,
        normal_classes=normal or None, n_normal=(int(n_normal) or None) if not normal else None, methods=methods,
        e1_epochs=e1_ep, rid_epochs=rid_ep, e2_epochs=e2_ep, n_regions=m, seed=seed, device=device,
        profile=profile if profile != cfg.model.profile else None)
    if not name.strip() or "/" in name or name.startswith("."):
        st.error("Give the run a name without '/' that does not start with '.'.")
        return
    if not methods:
        st.error("Pick at least one method.")
        return
    try:
        training.check_launch_paths(config, training.validate(config, overrides))
        cmd = training.build_command(config, overrides)
        pid = training.start_training(out_dir / name.strip(), cmd)
    except CMGError as exc:
        st.error(f"Not started: {exc}")
        return
    except OSError as exc:
        st.error(f"Could not start the training process: {exc}")
        return
    st.success(f"Started run **{name.strip()}** (pid {pid}). Its progress appears below; it keeps running if you "
               "leave or reload this page.")
    with st.expander("Command"):
        st.code(" ".join(cmd), language="bash")


def _open_run(path: str) -> None:
    st.session_state[state.RUN_KEY] = path
    state.set_current(path)


def show_launch(launch: training.Launch) -> None:
    with st.container(border=True):
        badge = {"running": ":orange-badge[running]", "starting": ":blue-badge[starting]",
                 "done": ":green-badge[done]", "failed": ":red-badge[failed]",
                 "stalled": ":red-badge[process ended]"}[launch.state]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(launch.started)) if launch.started else "?"
        st.markdown(f"**{launch.name}** {badge} · started {started}" + (f" · pid {launch.pid}" if launch.pid else ""))
        p = launch.progress
        if launch.active and p:
            st.progress(launch.fraction(), text=f"{p.get('stage', '?')}: {p.get('done', 0)}/{p.get('total', '?')} "
                                                f"{p.get('message', '')}")
        elif launch.state == "starting":
            st.progress(0.0, text="starting (loading data and models) ...")
        if launch.state == "stalled":
            st.error("run.json still says running, but its process has ended (killed or crashed). "
                     "See the log below.")
        if launch.state == "failed":
            st.error(f"Failed: {launch.info.get('error') or 'the process ended before finishing; see its output below.'}")
        if launch.state == "done":
            st.button("Open this run", key=f"open_{launch.name}", on_click=_open_run, args=(str(launch.path),))
        c1, c2 = st.columns(2)
        c1.caption("log.txt")
        c1.code(launch.log(15) or "(nothing yet)", language=None)
        c2.caption("process output (stdout.log)")
        c2.code(launch.stdout(15) or "(nothing yet)", language=None)
        if launch.active and launch.pid:
            if st.button("Stop this run", key=f"stop_{launch.name}"):
                try:
                    st.warning("Stop signal sent." if training.stop(launch) else "The process had already ended.")
                except CMGError as exc:
                    st.error(str(exc))


def live_section() -> None:
    st.subheader("Runs started here and running runs")
    root = state.runs_root()
    launches = training.launches(root)
    active = any(x.active for x in launches)

    @st.fragment(run_every=2.0 if active else None)
    def live() -> None:
        items = training.launches(root)
        if not items:
            st.info(f"No running run in `{root}`. Start one above.")
            return
        seen = st.session_state.setdefault(WATCH_KEY, {})
        finished_now = False
        for launch in items[:10]:
            if seen.get(launch.name) in ("running", "starting") and not launch.active:
                finished_now = True
            seen[launch.name] = launch.state
            with guard(f"run {launch.name}"):
                show_launch(launch)
        if finished_now or (active and not any(x.active for x in items)):
            st.rerun(scope="app")  # refresh the run picker with the finished run

    live()


def render() -> None:
    st.title("Train")
    st.caption(f"Runs are written to `{state.runs_root()}` (set `CMG_RUNS_DIR` to change it) and appear in the run "
               "picker when they start.")
    with guard("the run configuration"):
        config_form()
    with guard("the live progress"):
        live_section()


with guard("the Train page"):
    render()
