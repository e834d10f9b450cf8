"""Process-level settings for CPU-heavy training steps.

A training step allocates and frees the same large tensors every time (activations, pooled
embeddings, all-to-all buffers: several MiB each). glibc serves blocks above its mmap threshold
(128 KiB at first, adapting up to 32 MiB) with fresh mmap calls and returns freed heap memory
to the OS, so each step pays page faults and the kernel zeroing pages again: on the bench
config (bench_dlrm.toml, 2 CPU ranks) about a fifth of the step. Serving every block under
32 MiB from the heap and keeping freed memory in the process removes that; the cost is that a
process's resident memory stays at its peak (which `rectrain bench` reports) instead of
shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_applied = False


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """The C library, loaded once (find_library asks ldconfig every time it is called)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _libc(function: str):
    """The C library's `function` (ctypes), or None where there is none by that name."""
    return getattr(_c_library(), function, None)


def keep_freed_memory() -> bool:
    """Tune glibc malloc as the module docstring says (once per process; DataLoader workers
    forked later inherit it). False where the C library is not glibc (macOS, musl)."""
    global _applied
    if _applied:
        return True
    mallopt = _libc("mallopt")
    if mallopt is None or _libc("gnu_get_libc_version") is None:
        log.debug("train.keep_freed_memory: not glibc; the allocator is left as it is")
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    _applied = ok
    return ok


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc `malloc_trim(0)`): what a process
    then keeps resident is what it uses. False where the C library is not glibc."""
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_mb() -> float | None:
    """MiB the C allocator has handed out and not had back (glibc `mallinfo2`: heap blocks in
    use in every arena plus mmapped blocks): what a leak of tensors or buffers grows, whatever
    free memory the allocator keeps. None where the C library has no mallinfo2 (glibc < 2.33)."""
    info = _libc("mallinfo2")
    if info is None:
        return None
    info.restype = _MallInfo2
    got = info()
    return (got.uordblks + got.hblkhd) / 2 ** 20
