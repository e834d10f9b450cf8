"""The unit of work that flows from the reader to the model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data.schema import COUNTER_NAMES

if TYPE_CHECKING:
    from data.schema import Schema

# name -> (values int64 [n], lengths int64 [B])
Extras = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Batch(Pipelineable):
    """One mini-batch of B samples (Pipelineable: TorchRec's TrainPipelineSparseDist moves and
    pins it).

    dense:   float32 [B, num_dense]
    sparse:  KeyedJaggedTensor with one key per feature, batch size B
    labels:  float32 [B, num_labels], columns in `data.label_columns` order
    weights: float32 [B]; 0 marks padding rows that must not count in loss or metrics
    slot/position: which reader slot produced the batch and how many of that slot's rows
        were consumed after it (the data cursor the checkpoint saves)
    id_stats: int64 [num_features, len(COUNTER_NAMES)] negative/out_of_range/null/truncated
        id counts for this batch
    null_dense: missing dense values (filled with 0, and flagged when data.dense_missing is
        "indicator")
    negative_dense: negative dense values that the log1p transform folded by sign
    dropped_rows: rows read for this batch but left out (a NaN/inf dense value or label under
        data.non_finite = "drop_row"); `position` still counts them as consumed
    all_dropped: every row read for this batch was dropped; the batch is then one weight-0 row
        (like padding) that still carries slot/position so the cursor advances
    extras: the schema's passthrough columns, raw: name -> (values int64 [n], lengths int64 [B]);
        a null row has length 0
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    slot: int = -1
    position: int = 0
    id_stats: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COUNTER_NAMES)), dtype=np.int64))
    null_dense: int = 0
    negative_dense: int = 0
    dropped_rows: int = 0
    all_dropped: bool = False
    extras: Extras = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def __reduce_ex__(self, protocol):
        # A DataLoader worker sends each batch through a pipe with torch's ForkingPickler, which
        # gives every tensor a shared-memory segment of its own and passes its file descriptor
        # over a socket: about 15 ms per batch of the bench config (batch 2,048, 26 features),
        # several times the cost of reading it. The tensors' bytes inline in the pickle cost
        # well under 1 ms (and data/transport.py's shared slots less still). Anything this does
        # not cover (CUDA or non-contiguous tensors, autograd, KJT caches holding tensors)
        # pickles as before.
        parts = batch_tensors(self)
        if parts is None:
            return super().__reduce_ex__(protocol)
        tensors, skeleton = parts
        return _rebuild_inline, ([_pack(t) for t in tensors], skeleton)

    @property
    def num_samples(self) -> int:
        """Real samples: 0 for padding and for an all-dropped batch's weight-0 row."""
        return 0 if self.slot < 0 or self.all_dropped else self.batch_size

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return replace(
            self,
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            extras={k: (v.to(device, non_blocking=non_blocking), n.to(device, non_blocking=non_blocking))
                    for k, (v, n) in self.extras.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        # TrainPipelineSparseDist copies batches on a side stream; tell the allocator.
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)
        for values, lengths in self.extras.values():
            values.record_stream(stream)
            lengths.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return replace(
            self,
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            extras={k: (v.pin_memory(), n.pin_memory()) for k, (v, n) in self.extras.items()},
        )


def padding_batch(num_dense: int, keys: list[str], num_labels: int, weighted: bool,
                  passthrough: tuple[str, ...] | list[str] = ()) -> Batch:
    """A one-row batch with weight 0 (every passthrough column: one empty row).

    Sharded lookups are collectives: every rank must run every step. A rank whose data ran out
    first feeds this so the others can finish; weight 0 keeps it out of loss and metrics.
    """
    n = len(keys)
    return Batch(
        dense=torch.zeros(1, num_dense),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(0, dtype=torch.int64),
            lengths=torch.zeros(n, dtype=torch.int32),
            weights=torch.zeros(0) if weighted else None,
        ),
        labels=torch.zeros(1, num_labels),
        weights=torch.zeros(1),
        id_stats=np.zeros((n, len(COUNTER_NAMES)), dtype=np.int64),
        extras={name: (torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)) for name in passthrough},
    )


def padding_for(schema: "Schema") -> Batch:
    """The padding batch of `schema`'s streams."""
    return padding_batch(schema.num_dense, schema.feature_names, len(schema.label_columns), schema.weighted,
                         schema.passthrough)


# ---------------------------------------------------------------------------- inline pickling


def _packable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() and not t.requires_grad


def _pack(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], np.ndarray]:
    return t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()


def _unpack(packed: tuple[torch.dtype, tuple[int, ...], np.ndarray]) -> torch.Tensor:
    dtype, shape, raw = packed
    if not raw.flags.writeable:  # unpickled over the pickle's own bytes
        raw = raw.copy()
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _holds_tensor(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return not isinstance(value, (str, int, float, bool, type(None)))


# What rebuilds a batch around its tensors: (KJT tensor attribute names, the KJT's other
# attributes, passthrough names, the batch's other fields).
Skeleton = tuple[list[str], dict, list[str], dict]


def batch_tensors(batch: Batch) -> tuple[list[torch.Tensor], Skeleton] | None:
    """Every tensor of the batch (the KJT's as its attributes) in a fixed order and what else
    rebuilds it, or None when a tensor or KJT attribute is not plain enough to rebuild exactly
    from its bytes (CUDA, non-contiguous, autograd, KJT caches holding tensors)."""
    attrs = vars(batch.sparse)
    kjt_names = [k for k, v in attrs.items() if isinstance(v, torch.Tensor)]
    kjt_rest = {k: v for k, v in attrs.items() if not isinstance(v, torch.Tensor)}
    tensors = [batch.dense, batch.labels, batch.weights, *(attrs[k] for k in kjt_names)]
    tensors += [t for pair in batch.extras.values() for t in pair]
    if not all(_packable(t) for t in tensors) or any(_holds_tensor(v) for v in kjt_rest.values()):
        return None
    rest = {f: getattr(batch, f) for f in batch.__dataclass_fields__
            if f not in ("dense", "sparse", "labels", "weights", "extras")}
    return tensors, (kjt_names, kjt_rest, list(batch.extras), rest)


def rebuild_batch(tensors: list[torch.Tensor], skeleton: Skeleton) -> Batch:
    """The inverse of `batch_tensors`."""
    kjt_names, kjt_rest, extra_names, rest = skeleton
    dense, labels, weights = tensors[:3]
    kjt_tensors = tensors[3:3 + len(kjt_names)]
    extras = tensors[3 + len(kjt_names):]
    sparse = KeyedJaggedTensor.__new__(KeyedJaggedTensor)
    vars(sparse).update(kjt_rest)
    vars(sparse).update(zip(kjt_names, kjt_tensors))
    return Batch(dense=dense, sparse=sparse, labels=labels, weights=weights,
                 extras={name: (extras[2 * i], extras[2 * i + 1]) for i, name in enumerate(extra_names)}, **rest)


def _rebuild_inline(packed: list, skeleton: Skeleton) -> Batch:
    return rebuild_batch([_unpack(p) for p in packed], skeleton)
