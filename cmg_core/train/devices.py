"""Where a run computes (the end2end profile's encoders, torchrun): autocast, device placement, DDP,
SyncBatchNorm, the distributed sampler, shard logs, and the task's images held once on the device."""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import distributed as D
from ..features import to_float


class Devices:
    """The run's device and processes: `device`, bf16 autocast when `amp`, the torchrun group `dist`; `hold`
    puts the task's images (R, 3, S, S) uint8 and the CMER masks (M, 1, S, S) on the device for `batch`."""

    def __init__(self, device: torch.device, amp: bool, dist: D.DistInfo, log: Callable[[str], None]):
        self.device, self.amp, self.dist, self._log = device, amp, dist, log
        self.world, self.rank = dist.world_size, dist.rank
        self.main = self.rank == 0
        self.images = self.masks = None

    def hold(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images.to(self.device), masks.to(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def to_device(self, model: nn.Module) -> nn.Module:
        """On the run's device in channels_last (faster convolutions on GPUs and CPUs alike)."""
        return model.to(self.device).to(memory_format=torch.channels_last)

    def ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)

    def sync_bn(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def sampler(self, n: int, seed: int):
        from torch.utils.data import DistributedSampler

        return DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed,
                                  drop_last=self.world > 1)

    def log_shards(self, stage: str, epoch: int, shard: list[int]) -> None:
        """Under torchrun: every rank's training rows of an epoch, in the log (shards are disjoint)."""
        shards = D.all_gather_object([int(i) for i in shard])
        if self.world > 1:
            self._log(f"shards {stage} epoch {epoch}: " + json.dumps({str(r): s for r, s in enumerate(shards)}))

    def batch(self, idx: torch.Tensor, masks: np.ndarray | None = None) -> torch.Tensor:
        """Float images of rows `idx` on the device, multiplied by masks[index] per row when given (-1: unmasked)."""
        x = to_float(self.images[idx.to(self.images.device)])
        if masks is not None:
            pick = np.asarray(masks[idx.cpu().numpy()]) % (len(self.masks) + 1)  # -1 -> the all-ones mask
            x = x * torch.cat([self.masks, torch.ones_like(self.masks[:1])])[torch.as_tensor(pick, device=self.device)]
        return x.contiguous(memory_format=torch.channels_last)
