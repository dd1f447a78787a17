"""Sharded calibration over ``torch.distributed``: each process reads its share, the sums are all-reduced.

Every statistic the passes gather is a sum over samples, so a merge splits
exactly: each rank runs the passes on its shard, the sums are added across
ranks (gloo on the CPU, NCCL on GPUs), and every rank then matches and solves
the same systems, which keeps the sequential passes in step; rank 0 writes.
Without an initialised process group every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pleascc.passes.errors import PleasccError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def init_from_environment(device: str = "cpu") -> str:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Returns this rank's device: with ``device`` "cuda", the GPU of its local
    rank, and NCCL carries the sums; on the CPU, gloo does.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PleasccError(f"--distributed needs {', '.join(missing)} in the environment: start it with "
                           "torchrun --nproc-per-node N -m pleascc merge ... --distributed")
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return device


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's samples: every world-size-th one, from its rank on."""
    return x[rank()::dist.get_world_size()] if active() else x


def total(value: torch.Tensor | float) -> torch.Tensor | float:
    """The sum of ``value`` over all ranks (float64 on the wire)."""
    if not active():
        return value
    t = torch.as_tensor(value, dtype=torch.float64).to(_wire(), copy=True)
    dist.all_reduce(t)
    return t.to(value.device) if isinstance(value, torch.Tensor) else float(t)


def _wire() -> torch.device:
    """Where collectives' tensors must live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(t: torch.Tensor) -> torch.Tensor:
    """The average of ``t`` over all ranks, in its own dtype."""
    return (total(t) / dist.get_world_size()).to(t.dtype) if active() else t


def rank_zero_first(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (a common reference, e.g. the shift of running moments)."""
    if not active():
        return t
    wire = t.to(_wire(), copy=True)
    dist.broadcast(wire, src=0)
    return wire.to(t.device)
