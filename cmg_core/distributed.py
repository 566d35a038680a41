"""Multi-process (torchrun) helpers for the `end2end` profile; every function is a no-op in a single process.

Launch::

    torchrun --nproc_per_node 8 -m cmg_core.cli train --config configs/ucm_captions_paper.yaml

`init_distributed()` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
process group: backend ``nccl`` when CUDA is available, else ``gloo`` (CPU; used by the tests). Rank 0 is
the only process that writes files (run folder, checkpoints, logs); the others train and take part in the
collectives. The end2end profile (cmg_core.train.end2end) shards its training images with a DistributedSampler
and wraps its encoders in DistributedDataParallel (cmg_core.train.devices).

The `frozen` profile (cmg_core.train.frozen) is single-process: it trains small heads on cached features, which
gains nothing from several GPUs; `cmg_core.train.run.Training` joins no process group for it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False  # True when init_distributed() created the group (cleanup() destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun).

    WORLD_SIZE unset or 1: nothing happens (DistInfo() of a single process). On CUDA the process's device is
    set to cuda:LOCAL_RANK. Calling it again (or after the caller initialised the group) returns the info of
    the existing group.
    """
    world = env_world_size()
    if world <= 1 and not is_distributed():
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    created = False
    if not is_distributed():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # rank 0 alone runs CMER, RID and the per-epoch evaluation while the others wait in a collective
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
        created = True
    elif torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), created)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(info: DistInfo | None = None, wait: bool = True) -> None:
    """Leave the process group; with `info`, only when init_distributed() created it.

    `wait` first meets the other ranks at a barrier, so no rank tears its connections down while another
    still uses them (gloo aborts otherwise). Pass wait=False after an error on this rank: the others may be
    blocked in another collective, and torchrun stops them once this process exits.
    """
    if dist.is_available() and dist.is_initialized() and (info is None or info.initialized_here):
        import gc

        gc.collect()  # free DDP reducers that still hold the group
        if wait and is_distributed():
            dist.barrier()
        dist.destroy_process_group()


def device_for(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK when a CUDA device is asked for under torchrun."""
    if device.type == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return device


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s python object on every rank (pickled; for small things: decisions, label arrays)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks of a small float tensor (e.g. per-epoch loss sums)."""
    if not is_distributed():
        return values
    t = values.detach().to(_comm_device(), torch.float64).clone()
    dist.all_reduce(t)
    return (t / get_world_size()).to(values.device)


def all_gather_rows(x: torch.Tensor, keep_grad: bool = False) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `x (n_r, ...)` along dim 0 (n_r may differ between ranks).

    Returns (gathered (sum n_r, ...), offset of this rank's rows). With `keep_grad`, this rank's rows are
    `x` itself, so gradients flow into the local rows only: a loss computed identically on every rank over
    the gathered rows, back-propagated on each rank, gives each rank the exact gradient of the global loss
    with respect to its own rows; DDP's gradient averaging then needs the loss multiplied by world_size
    (`contrast_scale` of cmg_core.train.objective).
    """
    if not is_distributed():
        return x, 0
    world, rank = get_world_size(), get_rank()
    dev = _comm_device()
    n = torch.tensor([x.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    send = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=dev)
    send[: x.shape[0]] = x.detach().to(dev)
    parts = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(parts, send)
    pieces = [p[:s].to(x.device) for p, s in zip(parts, sizes)]
    if keep_grad:
        pieces[rank] = x
    return torch.cat(pieces), sum(sizes[:rank])
