"""DataLoader construction and step-aligned batch sequences."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from data.batch import Batch, padding_batch
from data.parquet import ParquetStream


def make_loader(stream: ParquetStream, device: torch.device, prefetch_factor: int = 2) -> DataLoader:
    """Batches are built in the workers (`batch_size=None`); one worker per reader slot."""
    workers = stream.num_workers
    return DataLoader(
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
    for batch in loader:
        if produced == steps:
            return
        yield batch
        produced += 1
    pad = padding_batch(schema.num_dense, schema.feature_names, len(schema.label_columns), schema.weighted)
    for _ in range(steps - produced):
        yield pad
