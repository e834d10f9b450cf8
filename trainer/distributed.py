"""Process group, device and rank information. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a
plain `rectrain train` is a world of one and gets an in-memory store, no port needed."""

from __future__ import annotations

import gc
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import ConfigError

# What init_process_group waits for its peers by default on gloo (torch's own default).
STORE_TIMEOUT = timedelta(minutes=30)
_HANDSHAKE = "rectrain/attempt"


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
        raise ConfigError("config key 'train.device': is 'cuda' but CUDA is not available on this machine; "
                          "use 'auto' or 'cpu'")
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
            store = attempt_store(rendezvous_store(rank, world_size), rank, world_size)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            rank, world_size, local_world_size = 0, 1, 1
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def rendezvous_store(rank: int, world_size: int, timeout: timedelta = STORE_TIMEOUT) -> dist.Store:
    """A client of the TCPStore at MASTER_ADDR:MASTER_PORT. Under torchrun the elastic agent
    hosts it (TORCHELASTIC_USE_AGENT_STORE=True) and it outlives worker restarts; otherwise rank
    0 hosts a fresh one, as env:// would."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=rank == 0 and not agent_hosts_it, timeout=timeout, multi_tenant=True)


def attempt_store(store: dist.Store, rank: int, world_size: int,
                  timeout: timedelta = STORE_TIMEOUT) -> dist.Store:
    """`store` seen through a key prefix that no earlier attempt of this job has written under,
    the same on every rank.

    torchrun's agent keeps its TCPStore across `--max-restarts` restarts (static and c10d
    rendezvous alike) and hands the same MASTER_ADDR/MASTER_PORT to the restarted workers. The
    killed attempt's process group left its keys there: gloo's full-mesh connect publishes each
    rank's listening address under `default_pg/0//cpu//0/<rank>` (NCCL its unique id likewise),
    then waits for and reads every peer's key. A restarted rank that reads a peer's key before
    that peer has rewritten it gets the address of a dead process: "Connection refused" in
    connectFullMesh, or a wait until the store timeout. A fresh prefix per attempt avoids that.

    TORCHELASTIC_RESTART_COUNT cannot be the prefix: each agent counts its own restarts, and an
    agent that restarts its workers because another node left or joined does not count it, so
    nodes disagree. Instead rank 0 draws a random token and hands it to every other rank in
    exchange for a nonce that rank drew itself: answers to an earlier attempt's requests land
    under keys nobody waits on, and acknowledgements are filed under the new token, which no
    earlier attempt can have written.
    """
    if world_size == 1:
        return dist.PrefixStore(f"rectrain/{uuid.uuid4().hex}", store)
    if rank == 0:
        token = uuid.uuid4().hex
        answered: dict[int, str] = {}
        waiting = set(range(1, world_size))
        deadline = time.monotonic() + timeout.total_seconds()
        while waiting:
            for r in sorted(waiting):
                if store.check([f"{_HANDSHAKE}/ack/{token}/{r}"]):
                    waiting.discard(r)
                    continue
                ask = f"{_HANDSHAKE}/ask/{r}"
                if store.check([ask]):
                    nonce = store.get(ask).decode()
                    if answered.get(r) != nonce:  # new, or left by an earlier attempt: answer either
                        store.set(f"{_HANDSHAKE}/token/{nonce}", token)
                        answered[r] = nonce
            if waiting:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {sorted(waiting)} did not join within {timeout} "
                                       f"(store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})")
                time.sleep(0.01)
    else:
        nonce = uuid.uuid4().hex
        store.set(f"{_HANDSHAKE}/ask/{rank}", nonce)
        token = store.get(f"{_HANDSHAKE}/token/{nonce}").decode()  # waits (store timeout) for rank 0
        store.set(f"{_HANDSHAKE}/ack/{token}/{rank}", "1")
    return dist.PrefixStore(f"rectrain/{token}", store)


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
    if not dist.is_initialized():  # one process without a group (export)
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` ([n_r, ...], n_r may differ by rank), concatenated in rank order;
    `x` itself without a process group. No gradient (models/retrieval.gather_rows has one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
