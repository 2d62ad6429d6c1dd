"""Data parallel training under torchrun: process-group setup, DDP wrapping, all-gather with gradients.

InfoNCE and the CS divergence are global over the batch, so each process gathers every process's
features. `all_gather_with_grad` keeps the graph: its backward all-reduces (sums) the gradient of
the gathered tensor and returns this process's slice. Every process computes the same global
loss L, so the slice is world_size * dL/d(local features); DDP then averages parameter gradients
over processes, which gives exactly dL/dθ of one process on the concatenated batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from csaligner.kernels.distributed import all_gather_with_grad

__all__ = ["DistInfo", "all_gather_no_grad", "all_gather_with_grad", "all_reduce_mean", "init_distributed", "wrap_ddp"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False
    """True when `init_distributed` created the process group (and `cleanup` should destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> the local CUDA device when available, else CPU; "cuda" -> cuda:<local_rank>."""
    if preference.startswith("cuda") and not torch.cuda.is_available():  # before "cuda" becomes "cuda:0": as given
        raise ValueError(
            f"train.device={preference!r} but CUDA is not available here; use train.device=cpu or train.device=auto"
        )
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        preference = f"cuda:{local_rank}"
    device = torch.device(preference)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"this process (local rank {local_rank}) would use {device} but {torch.cuda.device_count()} CUDA "
            "device(s) are visible; start at most that many processes per machine, or use train.device=cpu"
        )
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); else single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, created)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group this process initialised (not one its caller made).

    DDP reducers and gloo work objects left in reference cycles are collected first: freed later, during
    interpreter shutdown, gloo's threads can abort the process (SIGABRT) after training succeeded.
    """
    if info.initialized_here and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `module` when running on several processes; else `module` itself."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate every process's x along dim 0 (e.g. index tensors); no gradient."""
    with torch.no_grad():
        return all_gather_with_grad(x)


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over processes (they agree already for global losses)."""
    if not info.enabled:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / info.world_size).tolist(), strict=True))
