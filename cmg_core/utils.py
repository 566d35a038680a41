"""Small shared helpers: seeding, device choice, cache location, atomic file writes."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement in practice
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str = "auto") -> "torch.device":
    """`auto` picks cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` are taken as given."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r} is not a valid torch device (expected auto, cpu, cuda, cuda:N)") from exc


def cache_dir(sub: str = "") -> Path:
    """Root of the project's on-disk caches: $CMG_CACHE_DIR, else ~/.cache/cmg."""
    root = Path(os.environ.get("CMG_CACHE_DIR") or Path.home() / ".cache" / "cmg")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; it replaces `target` only if the block succeeds.

    Used for every file the project writes, so an interrupted write never leaves a half file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
