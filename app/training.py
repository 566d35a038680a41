"""Starting training runs in the background and finding them again (no Streamlit here).

A run is started as `python -m cmg_core.cli train --config ... --set name=... --set out_dir=...` in its own
session (`start_new_session=True`), so it outlives the page and the server; its stdout/stderr go to
`<run>/stdout.log` and `<run>/launch.json` records the pid and command.  After a page reload the Train page
finds running runs again from run.json (`status == "running"`) and launch.json.
"""
from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic.yaml"
LAUNCH_FILE = "launch.json"
STDOUT_FILE = "stdout.log"


METHOD_CHOICES = ("ssd", "ssd+er", "ssd+le[lle]", "ssd+le[supcon]", "cmg[lle]", "cmg[supcon]", "cmg-mse")


def config_files(folder: str | Path = REPO / "configs") -> list[Path]:
    """The YAML config files a run can start from (the project's configs/ folder)."""
    return sorted(Path(folder).glob("*.yaml"))


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
    """Start `command` detached (own session), stdout+stderr to <run_dir>/stdout.log; returns the pid."""
    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists() or (run_dir / LAUNCH_FILE).exists():
        raise ConfigError(f"a run named {run_dir.name!r} already exists in {run_dir.parent}; choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(run_dir / STDOUT_FILE, "ab") as out:
        proc = subprocess.Popen(list(command), cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=full_env)
    (run_dir / LAUNCH_FILE).write_text(json.dumps({"pid": proc.pid, "command": list(command),
                                                   "started": time.time(), "name": run_dir.name}, indent=2))
    return proc.pid


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
    """SIGTERM the process group the app started for this run (only ever that pid's group)."""
    if not launch.pid or not process_alive(int(launch.pid)):
        return False
    try:
        os.killpg(int(launch.pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True
