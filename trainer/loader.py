"""DataLoader construction and step-aligned batch sequences."""

from __future__ import annotations

import collections
import gc
import multiprocessing
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from data.batch import Batch, padding_for
from data.parquet import ParquetStream
from data.schema import DataError
from data.transport import BatchRing


class _Loader(DataLoader):
    """A DataLoader whose workers send batches through shared memory (data/transport.py): a
    ring made before the workers fork and kept alive with them while their batches can arrive
    (a fresh one for each iteration, or one for the loader's life with persistent workers).

    Iterating gives one Batch at a time (`_OneBatchAtATime`), though a worker may send several
    to a DataLoader item.

    Persistent workers (`make_loader(..., persistent=True)`) fork once and read every
    iteration's cursor from the main process (ParquetStream.cursor_channel). A fork per epoch
    costs more than the workers' start (80-110 ms on the bench): after it, every page the rank
    writes (tables, optimizer state, activations) is copied once, which on a 64-step epoch was
    24,000 page faults a second per rank and 20-25 ms of its embedding backward per step.
    Their batches are views of the ring's slots (`BatchRing(views=True)`): training lets each
    go after its step. Per-iteration loaders (evaluation, whose metrics may keep a batch's
    tensors) copy each batch out of its slot instead, so no slot stays held."""

    def __iter__(self):
        stream = self.dataset
        if self.persistent_workers and self._iterator is not None and getattr(self._iterator, "_shutdown", False):
            self._iterator = None  # its workers were stopped (a data error): fork new ones
        if self.persistent_workers and self._iterator is not None:
            for channel in self._cursor_channel:
                channel.put(stream.state_dict())
            return _OneBatchAtATime(super().__iter__(), self.num_workers)  # the same workers, reset
        ring = None
        fork = self.num_workers and _start_method(self) == "fork"
        if fork:  # the slots (and the cursor channel) are inherited memory
            schema = stream.schema
            ring = BatchRing.for_batches(self.num_workers, self.prefetch_factor, stream.batch_size,
                                         schema.num_dense, len(schema.label_columns), len(schema.features),
                                         schema.weighted, views=self.persistent_workers)
        stream.transport = ring
        stream.cursor_channel = None  # read by the workers forked now, whichever loader they serve
        if self.persistent_workers:  # (fork only: make_loader)
            ctx = multiprocessing.get_context("fork")
            self._cursor_channel = stream.cursor_channel = [ctx.SimpleQueue() for _ in range(self.num_workers)]
            for channel in self._cursor_channel:
                channel.put(stream.state_dict())
        # Forked workers share the parent's pages until they write to them, and a full garbage
        # collection in a worker writes to every object it traverses: the parent's 350,000
        # torch and model objects, copied page by page (184 ms for one gc.collect() in a bench
        # worker, 0.3 ms with them frozen). Frozen objects are never traversed, so the workers
        # collect only their own; the parent unfreezes its objects once the workers exist.
        gc.freeze()
        try:
            iterator = super().__iter__()
        finally:
            gc.unfreeze()
        iterator._batch_ring = ring
        return _OneBatchAtATime(iterator, self.num_workers)


class _OneBatchAtATime:
    """A DataLoader iterator's items one batch at a time, in the order one batch per item would
    have given. With a ring (data/transport.py) every item is a list of one worker's next
    batches; the DataLoader hands out items from its workers in turn, so a turn's items (one per
    worker still reading, told apart by their reader slot) are interleaved: the first of each,
    then the second of each, ... That order is the one the stream's cursor resumes in
    (ParquetStream.rotation). One exception: a worker's error is raised after the whole turn it
    ends (one batch per item would raise it at the failing batch's place in the turn), so up to
    BATCHES_PER_ITEM x workers - 1 batches the other workers had already sent still come before
    it; the cursor counts every batch handed out, so a run stopped by the error resumes
    exactly. Other items (no ring: no workers, spawn) are batches, passed on as they come. The
    iterator's own attributes (`_shutdown_workers`, `_workers`, ...) read through. (A worker
    never sends an empty list.)"""

    def __init__(self, items, num_workers: int) -> None:
        self._items = items
        self._num_workers = max(1, num_workers)
        self._pending: collections.deque = collections.deque()
        self._ahead = None  # an item read past the end of a turn
        self._error: BaseException | None = None  # raised once the turn before it is out

    def __iter__(self) -> "_OneBatchAtATime":
        return self

    def __next__(self) -> Batch:
        if not self._pending:
            self._next_turn()
        return self._pending.popleft()

    def _next_turn(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        turn: list[list[Batch]] = []
        slots: set[int] = set()
        while len(turn) < self._num_workers:
            item, self._ahead = self._ahead, None
            if item is None:
                try:
                    item = next(self._items)
                except StopIteration:
                    break
                except Exception as e:  # a worker's error: after the batches read before it
                    if not turn:
                        raise
                    self._error = e
                    break
            if not isinstance(item, list):
                if turn:
                    self._ahead = item
                    break
                self._pending.append(item)
                return
            if item[0].slot in slots:  # a worker's second item: the others are done
                self._ahead = item
                break
            slots.add(item[0].slot)
            turn.append(item)
        if not turn:
            raise StopIteration
        for k in range(max(len(batches) for batches in turn)):
            self._pending.extend(batches[k] for batches in turn if k < len(batches))

    def __getattr__(self, name: str):
        if name in ("_items", "_pending", "_ahead", "_error", "_num_workers"):  # not set yet
            raise AttributeError(name)
        return getattr(self._items, name)


def _start_method(loader: DataLoader) -> str:
    ctx = loader.multiprocessing_context
    return ctx.get_start_method() if ctx is not None else torch.multiprocessing.get_start_method()


def make_loader(stream: ParquetStream, device: torch.device, prefetch_factor: int = 2,
                persistent: bool = False) -> DataLoader:
    """Batches are built in the workers (`batch_size=None`); one worker per reader slot.
    `persistent`: the workers live across iterations (each starts at the stream's cursor when
    it starts) until `close_loader`; otherwise every iteration forks its own."""
    workers = stream.num_workers
    return _Loader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        pin_memory=device.type == "cuda",
        # Under spawn or forkserver a worker's stream is a pickle of the parent's at its start,
        # and the cursor channel is not inherited: workers are made per iteration there.
        persistent_workers=bool(persistent and workers and torch.multiprocessing.get_start_method() == "fork"),
    )


def close_loader(loader: DataLoader | None) -> None:
    """Stop a loader's persistent workers now (not whenever the loader is collected)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


def padded_batches(loader: DataLoader, steps: int, stream: ParquetStream) -> Iterator[Batch]:
    """Exactly `steps` batches: the rank's real batches, then weight-0 padding batches.

    Sharded lookups are collectives, so every rank must run the same number of steps; the
    rank with fewer rows pads (and its padding never counts in loss or metrics).
    """
    schema = stream.schema
    produced = 0
    batches = iter(loader)
    failure = None
    try:
        # Stop before pulling one batch too many: with num_workers = 0 reading it would move
        # the stream's cursor past a batch that is never trained.
        while produced < steps:
            batch = next(batches, None)
            if batch is None:
                break
            yield batch
            produced += 1
        else:
            return
    except DataError as e:
        failure = worker_error_message(e)
    if failure is not None:
        # Stop the workers now: the DataLoader does not on a worker error, and its iterator,
        # kept alive by the error's reference cycle, would otherwise be collected later (maybe
        # in a forked child, which cannot stop them). Raised outside the except block so no
        # worker traceback is chained to the one-line error.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del batches
        raise DataError(failure)
    pad = padding_for(schema)
    for _ in range(steps - produced):
        yield pad


def worker_error_message(error: DataError) -> str:
    """The original one-line message of a DataError raised in a DataLoader worker.

    The DataLoader re-raises a worker's exception in the main process as the same class with
    "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...", the worker's
    traceback ending in "data.schema.DataError: <message>". Keep just <message>.
    """
    text = str(error)
    if not text.startswith("Caught DataError in "):
        return text
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    at = text.rfind(marker)
    if at < 0:
        marker = f"{DataError.__qualname__}: "
        at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text
