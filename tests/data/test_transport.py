"""data/transport.py: batches cross from DataLoader workers to the main process through shared
memory slots, arrive equal to the batches the worker built, and fall back to inline pickling
whenever a slot cannot take them; and data/parquet.py's memory-mapped reading refuses a file
that shrank under it instead of dying of SIGBUS."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import Batch
from data.parquet import ParquetStream
from data.schema import DataError, FeatureSpec, Schema
from data.transport import BatchRing, _InSlot
from tests.data.test_columnar import assert_same_batch
from trainer.loader import close_loader, make_loader

SCHEMA = Schema(label_columns=("label",), dense_columns=("d0", "d1"),
                features=(FeatureSpec("s", 100), FeatureSpec("t", 7)), dense_transform="log1p")


def _table(lo: int, hi: int) -> pa.Table:
    r = np.arange(lo, hi)
    return pa.table({"label": pa.array(r % 2, pa.int64()), "d0": pa.array(r * 1.5, pa.float32()),
                     "d1": pa.array(-r, pa.float64()), "s": pa.array(r * 3, pa.int64()),
                     "t": pa.array(r, pa.int64())})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("transport")
    for k, (lo, hi) in enumerate([(0, 150), (150, 240)]):
        pq.write_table(_table(lo, hi), root / f"part-{k}.parquet", row_group_size=40)
    return str(root)


def _stream(path: str, **kw) -> ParquetStream:
    args = dict(batch_size=16, shuffle=True, shuffle_buffer_rows=32, seed=5)
    args.update(kw)
    return ParquetStream(path, SCHEMA, **args)


def _ring(slots: int = 2, slot_bytes: int = 1 << 16) -> BatchRing:
    return BatchRing(num_workers=1, slots=slots, slot_bytes=slot_bytes)


def _free(ring: BatchRing, worker: int = 0) -> int:
    return ring._free[worker].get_value()


def test_workers_deliver_through_the_ring_what_they_build(dataset, monkeypatch):
    """Two workers, batches keyed by (slot, position): equal to the in-process ones, and every
    one of them was taken out of a slot here (none fell back to inline pickling)."""
    taken = []
    take = BatchRing.take

    def counting_take(self, *args):
        taken.append(args[:2])  # (worker, slot)
        return take(self, *args)

    monkeypatch.setattr(BatchRing, "take", counting_take)
    reference = {}
    for slot in (0, 1):
        for b in _stream(dataset, num_workers=2)._slot_batches(slot):
            reference[(b.slot, b.position)] = b
    stream = _stream(dataset, num_workers=2)
    got = list(make_loader(stream, torch.device("cpu"), prefetch_factor=2))
    assert len(got) == len(reference) == 16  # 120 rows per slot in batches of 16
    for b in got:
        assert_same_batch(b, reference[(b.slot, b.position)])
        b.dense += 1  # writable, and nobody else's memory
    assert sum(b.batch_size for b in got) == 240
    # nearly every batch came through a slot (a worker that outlives the other at the end of the
    # epoch may send its last ones inline), and each worker filled its slots in turn (copied out
    # at once, they free in the order they were filled): (prefetch 2 + 1) items of 4 batches
    assert len(taken) >= 12 and {w for w, _ in taken} == {0, 1}
    for w in (0, 1):
        mine = [s for v, s in taken if v == w]
        assert mine == [i % 12 for i in range(len(mine))]


def test_a_batch_round_trips_through_a_slot_and_frees_it(dataset):
    ring = _ring(slots=2)
    batch = next(iter(_stream(dataset)))
    sent = ring.put(0, batch)
    assert isinstance(sent, _InSlot) and _free(ring) == 1
    data = ForkingPickler.dumps(sent)
    tensor_bytes = sum(t.numel() * t.element_size() for t in (batch.dense, batch.labels, batch.weights,
                                                              batch.sparse.values(), batch.sparse.lengths()))
    assert len(data) + tensor_bytes <= len(ForkingPickler.dumps(batch))  # the bytes stay in the slot
    back = pickle.loads(data)
    assert _free(ring) == 2
    assert_same_batch(back, batch)
    # the batch owns its memory: the slot's next batch does not change it
    before = back.sparse.values().clone()
    ring._bytes[:] = 0xFF
    assert torch.equal(back.sparse.values(), before)


def test_slots_are_used_in_turn_and_a_full_ring_sends_inline(dataset):
    ring = _ring(slots=2)
    batches = list(_stream(dataset))[:3]
    first, second = ring.put(0, batches[0]), ring.put(0, batches[1])
    assert (first.slot, second.slot) == (0, 1)
    assert ring.put(0, batches[2]) is batches[2]  # no free slot: the batch itself, pickled inline
    assert_same_batch(pickle.loads(ForkingPickler.dumps(first)), batches[0])
    third = ring.put(0, batches[2])
    assert third.slot == 0
    assert_same_batch(pickle.loads(ForkingPickler.dumps(second)), batches[1])
    assert_same_batch(pickle.loads(ForkingPickler.dumps(third)), batches[2])
    assert _free(ring) == 2


def test_a_batch_larger_than_a_slot_goes_inline(dataset):
    batch = next(iter(_stream(dataset)))
    ring = _ring(slots=1, slot_bytes=256)
    assert ring.put(0, batch) is batch and _free(ring) == 1


def test_slot_size_for_a_full_batch():
    """for_batches sizes slots for batch_size rows of one id per feature, weighted or not."""
    batch = Batch(dense=torch.zeros(64, 13), labels=torch.zeros(64, 2), weights=torch.ones(64),
                  sparse=_kjt(26, 64, weighted=True))
    ring = BatchRing.for_batches(1, prefetch_factor=2, batch_size=64, num_dense=13, num_labels=2, num_features=26,
                                 weighted=True)
    assert ring.slots == 12 and ring.batches_per_item == 4 and not ring.views  # 3 items of 4 batches
    assert isinstance(ring.put(0, batch), _InSlot)
    # lent as views, the main process holds one more item; batches over 1 MiB travel alone
    assert BatchRing.for_batches(1, 2, 64, 13, 2, 26, True, views=True).slots == 16
    big = BatchRing.for_batches(1, 2, 1 << 16, 13, 2, 26, True)
    assert big.batches_per_item == 1 and big.slots == 3


def _kjt(features: int, rows: int, weighted: bool):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = features * rows
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(features)], values=torch.arange(n),
                             lengths=torch.ones(n, dtype=torch.int32), weights=torch.rand(n) if weighted else None)


def test_passthrough_and_non_plain_batches(dataset):
    ring = _ring(slots=4)
    batch = next(iter(_stream(dataset)))
    batch.extras = {"p": (torch.arange(5), torch.tensor([2, 3]))}
    back = pickle.loads(ForkingPickler.dumps(ring.put(0, batch)))
    assert_same_batch(back, batch)
    odd = next(iter(_stream(dataset)))
    odd.dense = odd.dense.t()  # not contiguous: not plain bytes, pickled the usual way
    assert ring.put(0, odd) is odd


def test_the_ring_is_not_inherited_under_spawn():
    ring = _ring()
    assert pickle.loads(pickle.dumps(ring)) is None


# --------------------------------------------------------------------------- memory-mapped files


def test_a_file_that_shrinks_during_the_run_is_an_error_naming_it(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(_table(0, 160), path, row_group_size=32)
    stream = ParquetStream(str(tmp_path), SCHEMA, batch_size=32, shuffle=True, shuffle_buffer_rows=32, seed=1)
    it = iter(stream)
    next(it)  # the file is mapped now
    assert stream._mapped == {str(path): os.path.getsize(path)}
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=re.escape(f"{path}: changed after the run started (") + r"\d+ bytes now"):
        list(it)


def test_a_file_replaced_under_its_name_keeps_reading_the_mapped_one(tmp_path):
    """Writing a new file and renaming it over the old one (what a careful writer does) leaves
    the running pass on the file it mapped: same batches as without the replacement."""
    path = tmp_path / "a.parquet"
    pq.write_table(_table(0, 96), path, row_group_size=32)

    def stream() -> ParquetStream:
        return ParquetStream(str(tmp_path), SCHEMA, batch_size=32, shuffle=True, shuffle_buffer_rows=32, seed=2)

    whole = [b.dense for b in stream()]
    it = iter(stream())
    first = next(it).dense
    other = tmp_path / "other.tmp"
    pq.write_table(_table(500, 596), other, row_group_size=32)
    os.replace(other, path)
    rest = [b.dense for b in it]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip([first, *rest], whole))


def _rss_file_kib() -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) for line in lines if line.startswith("RssFile:")]
    return found[0] if found else None


@pytest.mark.skipif(_rss_file_kib() is None, reason="needs Linux's /proc/self/status RssFile")
def test_mapped_pages_leave_resident_memory_once_decoded(tmp_path):
    """A pass over 64 MiB of mapped files leaves about the stream's budget of file pages
    resident (8 MiB here), not the dataset: past it, decoded row groups' pages leave the
    mapping."""
    rng = np.random.default_rng(0)
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    pq.write_table(_table(0, 64), small / "a.parquet")
    for k in range(4):
        n = 1 << 19
        t = pa.table({"label": pa.array(np.zeros(n, dtype=np.int64)), "d0": pa.array(np.ones(n, dtype=np.float32)),
                      "d1": pa.array(np.ones(n, dtype=np.float32)), "s": pa.array(rng.integers(0, 100, n)),
                      "t": pa.array(rng.integers(0, 1 << 40, n))})  # ids no codec shrinks
        pq.write_table(t, big / f"part-{k}.parquet", row_group_size=1 << 16, compression="none",
                       use_dictionary=False)
    size = sum(f.stat().st_size for f in big.iterdir())
    assert size > 60 << 20
    list(ParquetStream(str(small), SCHEMA, batch_size=16))  # code pages of the read path, loaded once
    stream = ParquetStream(str(big), SCHEMA, batch_size=1 << 14, shuffle=True, shuffle_buffer_rows=1 << 15)
    stream.map_budget = 8 << 20
    before = _rss_file_kib()
    rows = sum(b.batch_size for b in stream)
    grown = (_rss_file_kib() - before) << 10
    assert rows == 4 << 19 and len(stream._mapped) == 4
    assert grown < size // 4, f"{grown >> 20} MiB of the files stayed mapped"


# ------------------------------------------------------------------ batches lent as views


def test_a_lent_batch_is_a_view_of_its_slot_freed_when_it_is_gone(dataset):
    import gc

    ring = BatchRing(num_workers=1, slots=2, slot_bytes=1 << 16, views=True)
    batch = next(iter(_stream(dataset)))
    back = pickle.loads(ForkingPickler.dumps(ring.put(0, batch)))
    assert_same_batch(back, batch)
    assert _free(ring) == 1  # held while the batch lives
    ring._bytes[:] = 0  # no copy: the slot's bytes are the batch's
    assert not back.sparse.values().any() and not back.dense.any()
    values = back.sparse.values()  # one tensor kept is the whole slot kept
    del back
    gc.collect()
    assert _free(ring) == 1
    del values
    gc.collect()
    assert _free(ring) == 2


def test_lent_slots_freed_out_of_order_are_reused_without_touching_held_ones(dataset):
    import gc

    ring = BatchRing(num_workers=1, slots=3, slot_bytes=1 << 16, views=True)
    batches = list(_stream(dataset))[:4]
    held = [pickle.loads(ForkingPickler.dumps(ring.put(0, b))) for b in batches[:3]]
    assert ring.put(0, batches[3]) is batches[3]  # every slot lent: inline
    del held[1]  # the middle one goes first
    gc.collect()
    sent = ring.put(0, batches[3])
    assert isinstance(sent, _InSlot) and sent.slot == 1  # the free one, not the next in turn
    fourth = pickle.loads(ForkingPickler.dumps(sent))
    for got, want in zip([held[0], fourth, held[1]], [batches[0], batches[3], batches[2]]):
        assert_same_batch(got, want)


def test_persistent_workers_lend_batches_and_held_ones_stay_intact(dataset, monkeypatch):
    """A consumer that keeps every batch (here two whole epochs) holds every lent slot: the
    workers then send inline, and no held batch is ever overwritten."""
    taken = []
    take = BatchRing.take

    def counting_take(self, *args):
        taken.append(self.views)
        return take(self, *args)

    monkeypatch.setattr(BatchRing, "take", counting_take)
    reference = {}
    for epoch in (0, 1):
        for slot in (0, 1):
            s = _stream(dataset, num_workers=2)
            s.set_epoch(epoch)
            for b in s._slot_batches(slot):
                reference[(epoch, b.slot, b.position)] = b
    stream = _stream(dataset, num_workers=2)
    # (prefetch 1 + 2) items of 4 batches: 12 slots a worker, 24 for the epochs' 32 batches
    loader = make_loader(stream, torch.device("cpu"), prefetch_factor=1, persistent=True)
    try:
        kept = []
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            kept += [(epoch, b) for b in loader]
        assert len(kept) == 32
        for epoch, b in kept:
            assert_same_batch(b, reference[(epoch, b.slot, b.position)])
        assert taken and all(taken)  # lent, not copied
        assert len(taken) < 32  # the ring ran out while everything was kept: the rest came inline
    finally:
        close_loader(loader)


def test_a_worker_sends_batches_several_to_an_item_and_those_before_an_error_first(dataset):
    from types import SimpleNamespace

    stream = _stream(dataset, num_workers=1)
    batches = list(_stream(dataset)._slot_batches(0))[:6]

    def five_then_fail(slot):
        yield from batches[:5]
        raise DataError("part-1.parquet: column 's': bad")

    stream._slot_batches = five_then_fail
    stream.transport = BatchRing(num_workers=1, slots=8, slot_bytes=1 << 16, batches_per_item=4)
    items = stream._worker_batches(SimpleNamespace(id=0, num_workers=1))
    assert [len(next(items)), len(next(items))] == [4, 1]
    with pytest.raises(DataError, match="column 's'"):
        next(items)


def test_the_loader_interleaves_each_turn_of_items_as_one_batch_an_item_would():
    from types import SimpleNamespace

    from trainer.loader import _OneBatchAtATime

    def b(slot, k):
        return SimpleNamespace(slot=slot, name=f"{slot}{k}")

    class Items:
        _workers = ["w0", "w1"]

        def __init__(self, items):
            self.it = iter(items)

        def __next__(self):
            got = next(self.it)
            if isinstance(got, Exception):
                raise got
            return got

    # two workers in turn, four batches an item; slot 1 runs out first (a shorter last item)
    items = [[b(0, 0), b(0, 1), b(0, 2), b(0, 3)], [b(1, 0), b(1, 1), b(1, 2), b(1, 3)],
             [b(0, 4), b(0, 5), b(0, 6)], [b(1, 4)], [b(0, 7)]]
    batches = _OneBatchAtATime(Items(items), 2)
    assert [x.name for x in batches] == ["00", "10", "01", "11", "02", "12", "03", "13",
                                         "04", "14", "05", "06", "07"]
    assert batches._workers == ["w0", "w1"]  # the DataLoader iterator's attributes read through
    # a worker's error arrives after the turn read before it
    failing = _OneBatchAtATime(Items([[b(0, 0), b(0, 1)], [b(1, 0)], DataError("bad row group")]), 2)
    assert [next(failing).name for _ in range(3)] == ["00", "10", "01"]
    failing = _OneBatchAtATime(Items([[b(0, 0)], DataError("bad row group")]), 2)
    assert next(failing).name == "00"
    with pytest.raises(DataError, match="bad row group"):
        next(failing)
    # without a ring, items are batches: passed on as they come
    assert [x.name for x in _OneBatchAtATime(Items([b(1, 0), b(0, 0), b(0, 1)]), 2)] == ["10", "00", "01"]
