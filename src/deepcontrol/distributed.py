"""One run across several processes (``torchrun``): who this process is, and the collectives.

Without torchrun's environment every helper is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns this process's place and its device (``cuda:LOCAL_RANK`` on GPUs; NCCL there,
    gloo on the CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), device
    place = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return place, device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (in place), or ``tensor`` itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds in any process (so that all of them act alike)."""
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BN running statistics) before evaluation."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def wrap_model(model: nn.Module, place: Dist, sync_norm: bool) -> nn.Module:
    """DistributedDataParallel over ``model`` (BatchNorm → SyncBatchNorm with ``sync_norm``).

    In a single process the model is returned unchanged.
    """
    if not place.enabled:
        return model
    on_gpu = next(model.parameters()).is_cuda
    if sync_norm:
        if not on_gpu:
            raise ValueError("norm.sync=true needs CUDA: PyTorch's SyncBatchNorm is GPU-only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[place.local_rank] if on_gpu else None
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
