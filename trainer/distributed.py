"""Process group, device and rank information. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a
plain `rectrain train` is a world of one and gets an in-memory store, no port needed."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'train.device' is 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join (or create) the default process group: NCCL on GPU, gloo on CPU."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            rank, world_size, local_world_size = 0, 1, 1
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def shutdown() -> None:
    """Destroy the process group and let its threads finish while the interpreter is alive.

    Callers drop what holds the group first (Trainer, DMP, DDP). DDP and sharded modules sit in
    reference cycles, so without this collection the group's C++ object would die in the
    interpreter's final GC, when a gloo worker still releasing a finished collective's tensors
    can no longer take the GIL and the process aborts ("terminate called without an active
    exception") after a successful run.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def all_gather_objects(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
