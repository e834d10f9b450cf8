"""Batches from DataLoader workers to the main process through shared memory.

Why. A DataLoader worker hands each batch to the main process through a pipe: the worker
pickles the batch (0.75 MiB on the bench config) into the pipe 64 KiB at a time and the main
process reads it back and copies it out of the pickle: 0.75-0.87 ms of the main process's CPU
and 1.3-1.4 ms of wall time per batch (DataLoader overhead included), about what building the
batch costs. A worker that writes the bytes into a slot of memory both processes map, and sends
only the slot's number through the pipe, costs the main process 0.27-0.30 ms; one whose batches
the main process uses in place (`views`), and that sends them `batches_per_item` to a
DataLoader item (the DataLoader's own cost, about 0.1 ms of the main process's CPU per item
whatever it carries, is paid once for them), 0.16-0.23 ms. On a machine with as many CPUs as
workers that is the difference between two workers delivering 0.75-0.79x one per worker and
0.93-0.99x (README, Benchmarks).

How. A `BatchRing` is made in the main process just before the DataLoader forks its workers
(one per DataLoader iterator, or one for the life of persistent workers; trainer/loader.py), so
every worker inherits the mapping. Each worker owns `slots` slots; a semaphore per worker
counts its free ones and a shared flag per slot says whether it is in use. A worker that takes
a slot sets its flag; the main process clears it and releases the semaphore once the batch is
out of the slot: at once when it copies the batch out, or, with `views`, when the last of the
batch's tensors (views of the slot) is gone, which need not be in the order the slots were
filled. A worker that finds no free slot, or a batch larger than a slot (long id lists,
passthrough columns), sends that batch inline as before: the ring never blocks a worker. Under
the spawn or forkserver start methods the mapping is not inherited (the ring pickles as None)
and every batch goes inline.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import weakref

import numpy as np
import torch

from data.batch import Batch, batch_tensors, rebuild_batch

_ALIGN = 64  # every tensor starts on a cache line (and on its element size)
BATCHES_PER_ITEM = 4  # batches a worker sends to a DataLoader item...
_SMALL_BATCH_BYTES = 1 << 20  # ...when a batch takes no more than this; larger ones go one to an item
_RINGS: "weakref.WeakValueDictionary[tuple[int, int], BatchRing]" = weakref.WeakValueDictionary()
_serial = itertools.count()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class BatchRing:
    """`slots` shared slots of `slot_bytes` for each of `num_workers` DataLoader workers."""

    def __init__(self, num_workers: int, slots: int, slot_bytes: int, views: bool = False,
                 batches_per_item: int = 1) -> None:
        self.num_workers, self.slots, self.slot_bytes = num_workers, slots, _aligned(slot_bytes)
        self.views, self.batches_per_item = views, batches_per_item
        self.token = (os.getpid(), next(_serial))
        flags = _aligned(num_workers * slots)
        self._memory = mmap.mmap(-1, flags + max(1, num_workers * slots * self.slot_bytes))  # anonymous, shared
        self._in_use = np.frombuffer(self._memory, dtype=np.uint8, count=num_workers * slots)
        self._bytes = np.frombuffer(self._memory, dtype=np.uint8, offset=flags)
        ctx = multiprocessing.get_context("fork")
        self._free = [ctx.Semaphore(slots) for _ in range(num_workers)]
        self._next = [0] * num_workers  # worker side: where each worker looks for a free slot first
        _RINGS[self.token] = self

    @classmethod
    def for_batches(cls, num_workers: int, prefetch_factor: int, batch_size: int, num_dense: int, num_labels: int,
                    num_features: int, weighted: bool, views: bool = False) -> "BatchRing":
        """A ring whose slots hold a batch of one id per feature. Batches of up to 1 MiB travel
        four to a DataLoader item (larger ones alone: the item's cost is small next to
        theirs). A worker has at most `prefetch_factor` items on their way and builds the next,
        and with `views` the main process still holds the item it is consuming: slots for
        (prefetch_factor + 2) items, (prefetch_factor + 1) without views. (At the end of an
        epoch, a worker that outlives the others may be given more; those batches go inline.)"""
        per_row = 4 * (num_dense + num_labels + 1) + num_features * (8 + 4 + (4 if weighted else 0))
        slot_bytes = batch_size * per_row + 16 * _ALIGN
        per_item = BATCHES_PER_ITEM if slot_bytes <= _SMALL_BATCH_BYTES else 1
        items = prefetch_factor + (2 if views else 1)
        return cls(num_workers, items * per_item, slot_bytes, views=views, batches_per_item=per_item)

    def __reduce__(self):
        return _not_inherited, ()

    def put(self, worker: int, batch: Batch) -> "Batch | _InSlot":
        """In DataLoader worker `worker`: the batch copied into the worker's next slot, as the
        handle to send instead of it; or the batch itself (sent inline) when it does not fit or
        every slot is still in use."""
        parts = batch_tensors(batch)
        if parts is None:
            return batch
        tensors, skeleton = parts
        layout, at = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            layout.append((t.dtype, tuple(t.shape), at, n))
            at += _aligned(n)
        if at > self.slot_bytes or not self._free[worker].acquire(block=False):
            return batch
        slot = self._take_free_slot(worker)
        base = (worker * self.slots + slot) * self.slot_bytes
        for t, (_, _, offset, n) in zip(tensors, layout):
            if n:
                self._bytes[base + offset:base + offset + n] = t.reshape(-1).view(torch.uint8).numpy()
        return _InSlot(self.token, worker, slot, layout, skeleton)

    def _take_free_slot(self, worker: int) -> int:
        """In the worker, holding one count of its semaphore: a slot of its not in use, marked
        in use. The count guarantees one; the first free one from where the last was found."""
        first = worker * self.slots
        for k in range(self.slots):
            slot = (self._next[worker] + k) % self.slots
            if not self._in_use[first + slot]:
                self._in_use[first + slot] = 1
                self._next[worker] = (slot + 1) % self.slots
                return slot
        raise RuntimeError(f"batch ring {self.token}: worker {worker} holds a free count but no free slot")

    def take(self, worker: int, slot: int, layout: list, skeleton) -> Batch:
        """In the main process: the batch out of the slot. Copied, the slot freed now; with
        `views`, its tensors are views of the slot, which is freed when the last one is gone."""
        base = (worker * self.slots + slot) * self.slot_bytes
        tensors = []
        if self.views:
            # One tensor over the slot, and every batch tensor a view of it: they share its
            # storage, which alone holds `region`, so `region` goes (and the slot with it) when
            # the last of them does. (numpy slices of `region` would not hold it: their base is
            # the mapping's array.)
            region = self._bytes[base:base + self.slot_bytes]
            weakref.finalize(region, self._release, worker, slot).atexit = False
            whole = torch.from_numpy(region)
            for dtype, shape, offset, n in layout:
                tensors.append(whole[offset:offset + n].view(dtype).reshape(shape))
            return rebuild_batch(tensors, skeleton)
        for dtype, shape, offset, n in layout:
            raw = torch.empty(n, dtype=torch.uint8)
            if n:
                raw.numpy()[:] = self._bytes[base + offset:base + offset + n]
            tensors.append(raw.view(dtype).reshape(shape))
        self._release(worker, slot)
        return rebuild_batch(tensors, skeleton)

    def _release(self, worker: int, slot: int) -> None:
        self._in_use[worker * self.slots + slot] = 0  # before the count: the worker reads it after
        self._free[worker].release()


class _InSlot:
    """What a worker sends for a batch in a slot; unpickled in the main process, it is the batch."""

    __slots__ = ("token", "worker", "slot", "layout", "skeleton")

    def __init__(self, token, worker, slot, layout, skeleton) -> None:
        self.token, self.worker, self.slot, self.layout, self.skeleton = token, worker, slot, layout, skeleton

    def __reduce__(self):
        return _take, (self.token, self.worker, self.slot, self.layout, self.skeleton)


def _take(token, worker: int, slot: int, layout: list, skeleton) -> Batch:
    ring = _RINGS.get(token)
    if ring is None:  # the iterator that made the ring is gone, and with it the batch's reader
        raise RuntimeError(f"a DataLoader worker sent a batch through shared-memory ring {token}, which this "
                           f"process no longer holds")
    return ring.take(worker, slot, layout, skeleton)


def _not_inherited() -> None:
    return None
