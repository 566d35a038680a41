"""Small shared helpers: seeding, device and trunk-precision choice, cache location, atomic file writes, bounded
reading of archives and JSON from folders other people send."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import ConfigError, DataError

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


TRUNK_PRECISIONS = ("auto", "bf16", "fp32")


def _cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls/convolutions natively, not by emulation through fp32.

    `torch.backends.cpu.get_cpu_capability()` gives the vector level ATen dispatches to; in torch 2.x it is
    one of "DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE256" and never names bf16 itself
    ("AVX512" is also Skylake-X/Cascade Lake, which has no bf16 instructions).  So: levels below AVX512/SVE
    are fp32; at AVX512/SVE the feature flags of `torch.cpu.get_capabilities()` decide (x86: avx512_bf16 or
    amx_bf16, i.e. Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later; ARM: sve_bf16 or bf16).  A
    level string that names BF16 or AMX (possible in a later torch) counts as native too.
    """
    import torch

    level = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "BF16" in level or "AMX" in level:
        return True
    if not level.startswith(("AVX512", "SVE")):
        return False
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if get_capabilities is None:
        return False
    flags = get_capabilities()
    return any(bool(flags.get(k, False)) for k in ("avx512_bf16", "amx_bf16", "sve_bf16", "bf16"))


def resolve_trunk_precision(value: str, device) -> str:
    """`model.trunk_precision` -> "bf16" or "fp32" for a trunk on `device` (torch.device or str).

    `bf16` and `fp32` are returned as given.  `auto` is bf16 only where the hardware runs bf16 natively:
    a CUDA GPU with `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and later), or a CPU
    with native bf16 (see `_cpu_has_native_bf16`: AVX512-BF16 / AMX / SVE-BF16); fp32 everywhere else
    (AVX2, DEFAULT, NO AVX CPUs, AVX512 without bf16, other devices), where bf16 autocast is emulated and
    slower than fp32.
    """
    if value not in TRUNK_PRECISIONS:
        raise ConfigError(f"model.trunk_precision={value!r}; expected auto, bf16 or fp32")
    if value != "auto":
        return value
    import torch

    dev = resolve_device(device) if isinstance(device, str) and device in ("", "auto") else torch.device(device)
    if dev.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation (and counts native support only)
            native = torch.cuda.is_bf16_supported()
        except (RuntimeError, AssertionError):  # no usable CUDA
            native = False
        return "bf16" if native else "fp32"
    if dev.type == "cpu":
        return "bf16" if _cpu_has_native_bf16() else "fp32"
    return "fp32"


def cache_dir(sub: str = "") -> Path:
    """Root of the project's on-disk caches: $CMG_CACHE_DIR, else ~/.cache/cmg."""
    root = Path(os.environ.get("CMG_CACHE_DIR") or Path.home() / ".cache" / "cmg")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask (read from /proc where possible, since
    os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def is_temporary(path: Path) -> bool:
    """Whether `path` is an `atomic_path` temporary file (`.<name>.<random>.tmp`), e.g. one a killed process left."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file() and not path.is_symlink()


@contextlib.contextmanager
def atomic_path(target: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `target`; it replaces `target` only if the block succeeds.

    Used for every file the project writes, so an interrupted write never leaves a half file; `durable` also
    flushes the file and its folder to disk (fsync) before and after the rename, so a power cut cannot leave an
    empty file in its place (off for files rewritten constantly, e.g. progress.json).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _new_file_mode())  # mkstemp's 0600 would hide run folders from a colleague or the app
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, target)
        if durable:
            _fsync(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk (folders cannot be opened for this on some systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def machine_description(device: str = "auto") -> str:
    """One line naming the machine a timing came from: CPU model, cores, torch's CPU capability, GPU if used."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    if device != "cpu" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


MAX_ARCHIVE_BYTES = 8 << 30  # what one .npz of a run folder or packed file may decompress to
MAX_JSON_BYTES = 256 << 20  # a run folder's JSON / JSONL file


def check_archive(path: str | Path, limit: int | None = None) -> None:
    """DataError unless `path` is a zip (.npz) archive whose members add up to at most `limit` bytes once
    decompressed. Read from the archive's directory before anything is decompressed (zipfile never inflates a
    member past its declared size): a zip bomb is refused at once. limit None: MAX_ARCHIVE_BYTES."""
    limit = MAX_ARCHIVE_BYTES if limit is None else limit
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({exc})") from exc
    if total > limit:
        raise DataError(f"{path} would decompress to {total / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB "
                        "accepted; refusing to read it")


def load_npz(path: str | Path, limit: int | None = None) -> dict:
    """{member: array} of an .npz archive, bounded (`check_archive`) and without pickle (DataError otherwise)."""
    check_archive(path, limit)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:  # an object array would need pickle
        raise DataError(f"{path} holds pickled objects, which are not loaded: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} could not be read as .npz ({exc})") from exc


def load_npy(path: str | Path) -> np.ndarray:
    """An .npy array whose header agrees with the file's size (memory-mapped first: a header claiming more data
    than the file holds is an error, not an allocation), without pickle."""
    try:
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a valid .npy array ({exc})") from exc


def read_bounded_text(path: str | Path, limit: int = MAX_JSON_BYTES) -> str:
    """A text file of at most `limit` bytes (DataError naming it otherwise)."""
    size = Path(path).stat().st_size
    if size > limit:
        raise DataError(f"{path} is {size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB accepted")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


class ProgressLines:
    """A `progress(stage, done, total)` callback writing plain lines for a stream that is not a terminal (a log
    file, a pipe): one when a stage starts, one at each `1/steps` of it passed (25 %, 50 %, 75 % by default) and
    one when it ends, never a '\\r' redraw. At most steps + 1 lines per pass of a stage; a stage whose count goes
    back (the next run's pass) starts over."""

    def __init__(self, stream, steps: int = 4):
        import time

        self.stream, self.steps, self._clock = stream, max(1, int(steps)), time.monotonic
        self._stages: dict[str, list] = {}  # stage -> [last milestone written, last done, start time]

    def __call__(self, stage: str, done: int, total: int) -> None:
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        step = done * self.steps // total
        state = self._stages.get(stage)
        if state is None or done < state[1]:
            state = self._stages[stage] = [-1, done, self._clock()]
            self._write(stage, done, total, state, "start" if step < self.steps else "done")
        elif step > state[0]:
            self._write(stage, done, total, state, "done" if step >= self.steps else "")
        state[0], state[1] = max(state[0], step), done

    def _write(self, stage: str, done: int, total: int, state: list, word: str) -> None:
        elapsed = self._clock() - state[2]
        tail = f" {word}" if word else ""
        self.stream.write(f"{stage}: {done}/{total} ({100 * done // total}%, {elapsed:.0f} s){tail}\n")
        self.stream.flush()

    def close(self) -> None:
        self._stages.clear()


def progress_reporter(stream=None, **bar_options):
    """(progress(stage, done, total), close): one tqdm bar per stage when `stream` (default stderr) is a terminal;
    otherwise (a log file, a pipe, the app's Train page) `ProgressLines`: a plain line at a stage's start, every
    25 % and its end, never '\\r' redraws. `bar_options` go to tqdm (leave=False, dynamic_ncols=True by default)."""
    import sys

    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        lines = ProgressLines(stream)
        return lines, lines.close
    from tqdm import tqdm

    bars: dict = {}
    options = {"leave": False, "dynamic_ncols": True, **bar_options}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            close()
            bar = bars[stage] = tqdm(total=total, desc=stage, file=stream, **options)
        bar.n = done
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    return progress, close
