"""Every torch.distributed call of the project, with the tensors it sends on the worker's device.

On GPUs Ray Train starts an NCCL process group, and NCCL has no CPU backend: a collective on a CPU tensor
raises `RuntimeError: No backend type associated with device type cpu` (gloo, on CPU workers, takes either,
so a CPU test never sees it). Every tensor that goes through a collective is therefore moved to the
worker's device here, in one place; tests/test_collectives.py checks that no other module of `app/`
touches `torch.distributed`. DeepSpeed's own collectives (ZeRO gathers) run inside DeepSpeed on its
parameters, which live on the device already.

    count = all_reduce(torch.tensor([len(jobs)]), device, op="max")   # (1,) on `device`
    parts = all_gather_objects(local)                                  # one per rank
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    """Whether a process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def backend() -> str:
    """The process group's backend name (nccl, gloo, or a device:backend list)."""
    return str(dist.get_backend())


def all_reduce(tensor: torch.Tensor, device: torch.device, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """Reduce `tensor` over all ranks; returns the result on `device`, the worker's device (the input is
    copied there first if it lives elsewhere: NCCL refuses CPU tensors)."""
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=REDUCE_OPS[op])
    return on_device


def all_gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's picklable `value`, in rank order. torch serialises them into tensors on the current
    CUDA device under NCCL (Ray Train sets it per worker) and on the CPU under gloo."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def destroy_process_group() -> None:
    """Tear down this process's group, if there is one."""
    if is_distributed():
        dist.destroy_process_group()
