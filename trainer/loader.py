"""DataLoader construction and step-aligned batch sequences."""

from __future__ import annotations

import gc
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from data.batch import Batch, padding_for
from data.parquet import ParquetStream
from data.schema import DataError
from data.transport import BatchRing


class _Loader(DataLoader):
    """A DataLoader whose workers send batches through shared memory (data/transport.py): a
    fresh ring for each iterator, made before the iterator forks its workers and kept alive by
    it while their batches can arrive."""

    def __iter__(self):
        stream, ring = self.dataset, None
        if self.num_workers and _start_method(self) == "fork":  # the slots are inherited memory
            schema = stream.schema
            ring = BatchRing.for_batches(self.num_workers, self.prefetch_factor, stream.batch_size,
                                         schema.num_dense, len(schema.label_columns), len(schema.features),
                                         schema.weighted)
        stream.transport = ring
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
        return iterator


def _start_method(loader: DataLoader) -> str:
    ctx = loader.multiprocessing_context
    return ctx.get_start_method() if ctx is not None else torch.multiprocessing.get_start_method()


def make_loader(stream: ParquetStream, device: torch.device, prefetch_factor: int = 2) -> DataLoader:
    """Batches are built in the workers (`batch_size=None`); one worker per reader slot."""
    workers = stream.num_workers
    return _Loader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


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
