"""sagan-train's processes: torchrun's ranks and devices, and the two points where they must agree
(rank 0's writes to the run folder, and the replicas' weights before a checkpoint)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .train_config import UsageError


class StoppedWithRankZero(UsageError):
    """Another rank's side of a failure on rank 0 (a file it could not write): every rank stops
    with exit status 2 at the same point instead of waiting for rank 0 in the next collective."""


def setup_distributed(device_option: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_option == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device_option}: this torch has no CUDA device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def agree(failure: Exception | None, rank: int, world: int, device: torch.device, step: int) -> None:
    """After rank 0 wrote (or failed to write) the run folder: raise `failure` on the rank that
    had it, and StoppedWithRankZero on every other rank, so that all stop together (exit
    status 2) rather than the others waiting for rank 0 in their next collective."""
    if world > 1:
        flag = torch.tensor([int(failure is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and failure is None:
            raise StoppedWithRankZero(f"rank {rank}: rank 0 could not write the run folder (its message "
                                      f"says why); every rank stopped at step {step}")
    if failure is not None:
        raise failure


def check_replicas(models: list[nn.Module], world: int, step: int) -> None:
    """Every rank must hold the same weights and spectral-norm vectors u, v. (BN running
    statistics are not checked: without --sync-bn each rank's are its own, and DDP
    re-broadcasts rank 0's at every forward.)"""
    tensors = [t for m in models for t in m.parameters()]
    tensors += [b for m in models for name, b in m.named_buffers() if name.endswith(("_u", "_v"))]
    local = torch.stack([t.detach().double().sum() for t in tensors])
    everyone = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(everyone, local)
    if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError(f"step {step}: the data-parallel replicas hold different weights or SN vectors")
