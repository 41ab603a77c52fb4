"""Several processes (torchrun, PyTorch DDP) running one run: joining the group, rank 0's work, leaving.

Outside torchrun every function here is a no-op for a single process. Which process prints is
utils.is_main_process (torch-free, so that utils.log works in every stage).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import Any

import torch
import torch.distributed as dist

from utils import InputError


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, join the process group (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


def on_rank_0(work: Callable[[], Any], rank: int, world_size: int) -> Any:
    """work() on rank 0 only (writing the run folder); its result, or its failure, on every rank.

    Without this, a rank 0 that fails here alone would leave the other ranks waiting in their next
    collective. Rank 0 raises its own error; the others raise an InputError with its message, so
    that every process ends in one line.
    """
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:
            if world_size == 1:
                raise
            error = e
    if world_size == 1:
        return result
    message = None if error is None else str(error) if isinstance(error, InputError) else f"rank 0 failed: {type(error).__name__}: {error}"
    box = [result, message]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise InputError(box[1])
    return box[0]


def gather_on_every_rank(item: Any, world_size: int) -> list[Any]:
    """Every process's `item` (a picklable object), in rank order, on every process."""
    if world_size == 1:
        return [item]
    items: list[Any] = [None] * world_size
    dist.all_gather_object(items, item)
    return items


def leaves_process_group(main: Callable[..., Any]) -> Callable[..., Any]:
    """Destroy the process group when `main` ends, whether it returns or raises, so no rank leaves it dangling."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return wrapper
