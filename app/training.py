"""Starting training runs in the background and finding them again (no Streamlit here).

A run is started as `python -m cmg_core.cli train --config ... --set name=... --set out_dir=...` in its own
session (`start_new_session=True`), so it outlives the page and the server; its stdout/stderr go to
`<run>/stdout.log` and `<run>/launch.json` records the pid and command.  After a page reload the Train page
finds running runs again from run.json (`status == "running"`) and launch.json.

Nobody in: the page starts runs only from configs under `configs/` and on data under the allowed folders
(`allowed_data_dirs`), and Stop signals only a process this app started. That is checked against the app's own
launch record (`launch_registry()`, outside every run folder, so a run folder received from someone else cannot
name a process): same pid, same kernel start time (a reused pid differs), and the pid leads its process group.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cmg_core.errors import ConfigError
from cmg_core.methods import method_choices
from cmg_core.utils import atomic_path, cache_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic.yaml"
LAUNCH_FILE = "launch.json"
STDOUT_FILE = "stdout.log"


METHOD_CHOICES = tuple(method_choices())  # every method of cmg_core.methods.REGISTRY


def config_files(folder: str | Path = REPO / "configs") -> list[Path]:
    """The YAML config files a run can start from (the project's configs/ folder)."""
    return sorted(Path(folder).glob("*.yaml"))


def allowed_data_dirs() -> list[Path]:
    """Folders the Train page may read datasets from: $CMG_DATA_DIRS (os.pathsep-separated) when set, else the
    repository and ../shared/data beside it."""
    env = os.environ.get("CMG_DATA_DIRS")
    dirs = [Path(d).expanduser() for d in env.split(os.pathsep) if d] if env else [REPO, REPO.parent / "shared" / "data"]
    return [d.resolve() for d in dirs]


def check_inside(path: str | Path, roots: Sequence[Path], what: str, hint: str) -> Path:
    """`path` resolved (links followed), if it lies under one of `roots`; else a ConfigError naming both."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise ConfigError(f"{what} {path} is outside the folders this app may use ({', '.join(map(str, roots))}); "
                          f"{hint}")
    return resolved


def check_launch_paths(config: str | Path, cfg) -> None:
    """The Train page's guard: the config file is one of configs/, the dataset (cfg.data.root, if any) lies under
    `allowed_data_dirs()`."""
    check_inside(config, [(REPO / "configs").resolve()], "config file", "pick one of configs/")
    if cfg.data.root:
        check_inside(cfg.data.root, allowed_data_dirs(), "dataset folder",
                     "set CMG_DATA_DIRS before starting the app to allow other folders")


def build_overrides(name: str, out_dir: str | Path, dataset: str | None = None, root: str | None = None,
                    normal_classes: Sequence[str] | None = None, n_normal: int | None = None,
                    methods: Sequence[str] | None = None, e1_epochs: int | None = None,
                    rid_epochs: int | None = None, e2_epochs: int | None = None, n_regions: int | None = None,
                    seed: int | None = None, device: str | None = None, profile: str | None = None) -> list[str]:
    """`key=value` overrides (YAML values) for `cmg train --set`."""
    o = [f"name={name}", f"out_dir={out_dir}"]
    if profile:
        o.append(f"model.profile={profile}")
    if dataset:
        o.append(f"data.name={dataset}")
    if root:
        o.append(f"data.root={json.dumps(str(root))}")
    if normal_classes:
        o.append(f"task.normal_classes={json.dumps(list(normal_classes))}")
        o.append("task.n_normal=null")
    elif n_normal:
        o.append(f"task.n_normal={int(n_normal)}")
        o.append("task.normal_classes=null")
    if methods:
        o.append(f"train.methods={json.dumps(list(methods))}")
    for key, v in (("e1.epochs", e1_epochs), ("cmer.rid_epochs", rid_epochs), ("e2.epochs", e2_epochs),
                   ("cmer.n_regions", n_regions), ("task.seed", seed), ("train.seed", seed)):
        if v is not None:
            o.append(f"{key}={int(v)}")
    if device:
        o.append(f"train.device={device}")
    return o


def validate(config: str | Path, overrides: Sequence[str]):
    """The RunConfig the command would build (raises ConfigError with a clear message)."""
    from cmg_core.config import load_config

    return load_config(config, list(overrides))


def build_command(config: str | Path, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "cmg_core.cli", "train", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def start_training(run_dir: str | Path, command: Sequence[str], cwd: str | Path = REPO,
                   env: dict | None = None) -> int:
    """Start `command` detached (own session), stdout+stderr to <run_dir>/stdout.log; returns the pid. The launch
    is recorded in launch.json (for the page) and in the app's own registry (for Stop)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"a run named {run_dir.name!r} already exists in {run_dir.parent}; choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(run_dir / STDOUT_FILE, "ab") as out:
        proc = subprocess.Popen(list(command), cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=full_env)
    record = {"pid": proc.pid, "command": list(command), "started": time.time(), "name": run_dir.name,
              "process_start": process_start(proc.pid)}
    with _registry() as launches:
        launches[str(run_dir.resolve())] = record
    with atomic_path(run_dir / LAUNCH_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return proc.pid


def launch_registry() -> Path:
    """The app's record of the processes it started ({resolved run folder: launch record}), in the user's cache."""
    return cache_dir("app") / "launches.json"


@contextlib.contextmanager
def _registry():
    """The launch registry as a dict, locked against other sessions and servers; written back when the block ends."""
    path = launch_registry()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(path)
        yield data
        alive = {k: v for k, v in data.items() if process_alive(int(v.get("pid") or 0))}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(alive, indent=2))
            os.chmod(tmp, 0o600)


def process_start(pid: int) -> int | None:
    """Kernel start time of process `pid` (clock ticks after boot, /proc/<pid>/stat field 22); None if unknown."""
    try:
        return int(Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def started_here(launch: "Launch") -> bool:
    """True when this app started `launch`'s process and it still runs: the registry names this run folder with
    the same pid and kernel start time, and the pid leads its own process group."""
    if not launch.pid:
        return False
    with _registry() as launches:
        record = launches.get(str(Path(launch.path).resolve()))
    pid = int(launch.pid)
    if not record or int(record.get("pid") or 0) != pid or record.get("process_start") is None:
        return False
    try:
        leads_group = os.getpgid(pid) == pid
    except OSError:
        return False
    return leads_group and process_start(pid) == record["process_start"]


def process_alive(pid: int) -> bool:
    """True while process `pid` runs (reaps it when it is our finished child, so zombies count as ended)."""
    if not pid or pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier server): ask the kernel
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie that is not ours to reap
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tail(path: Path, lines: int = 25, max_bytes: int = 200_000) -> str:
    """Last lines of a log; progress bars redrawn with \\r show only their latest state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    out = []
    for line in text.split("\n"):
        segments = [seg for seg in ANSI.sub("", line).split("\r") if seg.strip()]
        if segments:
            out.append(segments[-1].rstrip())
    return "\n".join(out[-lines:])


@dataclass
class Launch:
    name: str
    path: Path
    state: str  # starting | running | done | failed | stalled
    pid: int | None
    started: float
    progress: dict
    info: dict

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    def fraction(self) -> float:
        total = max(int(self.progress.get("total", 0) or 0), 1)
        return max(0.0, min(1.0, int(self.progress.get("done", 0) or 0) / total))

    def log(self, lines: int = 25) -> str:
        return tail(self.path / "log.txt", lines)

    def stdout(self, lines: int = 25) -> str:
        return tail(self.path / STDOUT_FILE, lines)


def describe(run_dir: Path) -> Launch | None:
    """State of a run folder that is running or was started from the app; None for other folders."""
    launch = _read(run_dir / LAUNCH_FILE)
    info = _read(run_dir / "run.json")
    if not launch and info.get("status") != "running":
        return None
    pid = launch.get("pid")
    alive = process_alive(int(pid)) if pid else None
    status = info.get("status")
    if status == "running":
        state = "stalled" if alive is False else "running"
    elif status in ("done", "failed"):
        state = status
    elif status == "partial":  # stopped by a time budget (CMG_DEADLINE) with some methods finished
        state = "done"
    elif alive:
        state = "starting"
    else:
        state = "failed"
    return Launch(name=info.get("name", run_dir.name), path=run_dir, state=state, pid=pid,
                  started=float(launch.get("started") or info.get("created") or 0), progress=_read(run_dir / "progress.json"),
                  info=info)


def launches(root: str | Path) -> list[Launch]:
    """Running runs and runs started from the app under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [d for d in (describe(p) for p in root.iterdir() if p.is_dir()) if d is not None]
    return sorted(out, key=lambda x: x.started, reverse=True)


def stop(launch: Launch) -> bool:
    """SIGTERM the process group the app started for this run; False when it had already ended. A process this
    app did not start (launch.json of a received folder, a reused pid, a run started from a terminal) is never
    signalled: ConfigError."""
    if not launch.pid or not process_alive(int(launch.pid)):
        return False
    if not started_here(launch):
        raise ConfigError(f"run {launch.name!r}: process {launch.pid} was not started by this app (or its record "
                          "is gone); nothing was signalled - stop it where it was started")
    try:
        os.killpg(int(launch.pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True
