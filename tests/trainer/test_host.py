"""trainer/host.py: freed memory stays in the process (glibc)."""

from __future__ import annotations

import ctypes.util
import resource

import numpy as np
import pytest

from trainer.host import heap_in_use_mb, keep_freed_memory, release_freed_memory


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _churn(size: int, blocks: int, times: int) -> int:
    """Minor page faults of `times` rounds of allocating and touching `blocks` blocks of `size`
    bytes together, then freeing them all (a training step's activations, in small)."""
    before = _minor_faults()
    for _ in range(times):
        held = [np.ones(size, dtype=np.uint8) for _ in range(blocks)]  # touches every page
        del held
    return _minor_faults() - before


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_a_freed_block_is_reused_without_new_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator is left as it is")
    assert keep_freed_memory()  # idempotent
    size, blocks, times = 8 << 20, 8, 4
    pages = size * blocks // resource.getpagesize()
    _churn(size, blocks, 1)  # the first round faults its pages in once
    faults = _churn(size, blocks, times)
    # Returned to the OS after each round (glibc's default trims a free heap top above twice
    # its mmap threshold), every round would fault all `pages` again.
    assert faults < pages, (faults, pages)


def _resident_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_release_hands_the_kept_free_memory_back():
    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator is left as it is")
    held = [np.ones(8 << 20, dtype=np.uint8) for _ in range(12)]  # 96 MiB on the heap, touched
    del held
    kept = _resident_mb()
    assert release_freed_memory()
    # the 96 MiB were free but resident (kept for reuse); trimmed, they leave the process
    assert _resident_mb() < kept - 64, (kept, _resident_mb())


@pytest.mark.parametrize("keep, every, due", [(True, 3, [3, 6, 9]), (True, 0, []), (False, 3, [])])
def test_the_trainer_releases_freed_memory_every_n_steps(monkeypatch, keep, every, due):
    """train.release_freed_memory_every: at every multiple of it, and only while freed memory is
    kept (otherwise glibc returns it by itself)."""
    from types import SimpleNamespace

    import trainer.train as train

    calls = []
    monkeypatch.setattr(train, "release_freed_memory", lambda: calls.append(1) or True)
    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(keep_freed_memory=keep,
                                                                        release_freed_memory_every=every)))
    fired = [step for step in range(1, 11) if train.Trainer.release_memory_if_due(trainer, step)]
    assert fired == due and len(calls) == len(due)


def test_heap_in_use_counts_live_blocks_not_kept_free_ones():
    if heap_in_use_mb() is None:
        pytest.skip("the C library has no mallinfo2 (not glibc >= 2.33)")
    keep_freed_memory()
    before = heap_in_use_mb()
    held = [np.ones(8 << 20, dtype=np.uint8) for _ in range(8)]  # 64 MiB in use
    assert heap_in_use_mb() - before == pytest.approx(64, abs=4)
    del held  # freed: kept resident by the allocator, no longer in use
    assert heap_in_use_mb() - before == pytest.approx(0, abs=4)
