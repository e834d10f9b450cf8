"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``<dir>/step_00000123/`` (complete) — written first as ``step_00000123.partial/`` and
renamed by rank 0 only after every rank finished and DCP wrote its ``.metadata``. A crash
mid-save leaves a ``.partial`` directory that is never picked as "latest" and is cleaned up on
the next start. DCP stores sharded tensors by global offsets, so a checkpoint loads at any
world size and sharding plan.

Safety, on every save and agreed by all ranks (one rank's problem fails the save everywhere, no
rank is left waiting in a collective):

* a state holding NaN/Inf anywhere (model, local shards of sharded tables, optimizer state) is
  refused with a :class:`RunError` before anything is written, so keep-last rotation never
  drops good checkpoints for a poisoned one;
* a write that fails with an OSError (disk full, read-only, permissions) raises a
  :class:`RunError` naming the directory and the reason; the partial directory is removed and
  the previous complete checkpoint stays.

Async save (``Checkpointer(..., async_save=True)``): ``save()`` copies the state to CPU memory
of its own (so the next training step cannot change what is written), starts DCP's
``async_save`` on a dedicated gloo process group and returns; the files are written by a
background thread. The ``.partial`` → ``step_N`` rename and the rotation happen in
``finalize()``, after every rank's write completed: the trainer calls it at the end of training,
before exiting early, and whenever it needs the files; ``save()`` calls it first for the
previous save. The CPU copy is kept from one save to the next (no allocation after the first),
so async saving holds one extra copy of this rank's state in host memory until ``close()``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from trainer.errors import RunError

log = logging.getLogger("rectrain")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()


def step_of(path: Path) -> int | None:
    """The step of a `step_<N>` checkpoint directory (None for any other name)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------- agreement
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(local: Any) -> list[Any]:
    """Every rank's `local` (picklable), in rank order, on every rank; a barrier as well.
    Runs on the default group, from the main thread only."""
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def _first_failure(values: list[Any]) -> tuple[int, Any] | None:
    for rank, value in enumerate(values):
        if value is not None:
            return rank, value
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------- writable check
def check_writable(directory: str | Path) -> Path:
    """Create `directory` if needed and write and delete a probe file in it; raise RunError
    naming the directory and the OS reason if that fails. Call it on every rank at startup,
    before the model is built (when a process group exists, all ranks agree: one rank's
    failure raises on all)."""
    path = Path(directory)
    reason = None
    try:
        if path.exists() and not path.is_dir():
            reason = "it exists and is not a directory"
        else:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".rectrain-write-probe.{socket.gethostname()}.{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"rectrain write probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = _reason(e)
    failed = _first_failure(_agree(reason))
    if failed is not None:
        rank, reason = failed
        where = f" on rank {rank}" if dist.is_initialized() and dist.get_world_size() > 1 else ""
        raise RunError(f"checkpoint directory {path} is not writable ({reason}{where}); choose another "
                       f"checkpoint.dir or train.run_dir")
    return path


# ---------------------------------------------------------------------------- NaN/Inf scan
def _local_tensors(obj: Any, key: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) for every tensor this rank holds in `obj`: local shards of
    ShardedTensors, the local part of DTensors, plain tensors; through dicts, lists, tuples."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(obj, ShardedTensor):
        for shard in obj.local_shards():
            yield key, shard.tensor
    elif isinstance(obj, DTensor):
        yield key, obj.to_local()
    elif isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _local_tensors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _local_tensors(v, f"{key}.{i}" if key else str(i))


@torch.no_grad()
def first_non_finite(state: Any) -> str | None:
    """The key of the first floating tensor of `state` (this rank's part) holding NaN or Inf, or
    None. Vectorized per tensor: ``isfinite(t.sum())`` first, which is exact in one direction (a
    NaN or Inf element makes the sum non-finite, and additions never make it finite again) and
    allocates no tensor of the input's size; ``isfinite(t).all()`` only where the sum is not
    finite (a real NaN/Inf, or a sum that overflowed). One host sync per device when everything
    is finite."""
    keys: list[str] = []
    tensors: list[torch.Tensor] = []
    for key, t in _local_tensors(state, ""):
        if t.is_floating_point() and t.numel():
            keys.append(key)
            tensors.append(t)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    suspects: list[int] = []
    for idx in by_device.values():
        # Half-precision sums accumulate in float32 so that they overflow less often.
        sums = torch.stack([tensors[i].sum(dtype=torch.promote_types(tensors[i].dtype, torch.float32))
                            for i in idx])
        finite = torch.isfinite(sums)
        if not bool(finite.all()):
            suspects += [i for i, ok in zip(idx, finite.tolist()) if not ok]
    for i in sorted(suspects):
        if not bool(torch.isfinite(tensors[i]).all()):
            return keys[i]
    return None


# ---------------------------------------------------------------------------- async plumbing
class _PreStagedWriter(FileSystemWriter):
    """A FileSystemWriter whose state dict was already staged by the Checkpointer: DCP's
    async_save uses a storage writer that is an AsyncStager as the stager; this one copies
    nothing more."""

    def stage(self, state_dict):
        self.per_thread_copy_ahead = 0
        return state_dict


class _Stager:
    """Copies a state dict into CPU buffers of its own, kept from one save to the next (DCP's
    ``cache_staged_state_dict``: after the first save a copy costs no allocation and no page
    faults). Sharded tensors keep their shard layout and metadata; strings and numbers are taken
    as they are. Synchronous: the copy is complete when `stage` returns. The buffers may only be
    reused once the previous write finished (the Checkpointer finalizes before staging again)."""

    def __init__(self) -> None:
        self._buffers: dict | None = None
        self._signature: list | None = None

    @torch.no_grad()
    def stage(self, state: dict) -> dict:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        signature = [(k, tuple(t.shape), t.dtype) for k, t in _local_tensors(state, "")]
        if self._buffers is not None and signature == self._signature:
            try:
                return _copy_state_dict(state, self._buffers, type_check=False)
            except Exception:  # noqa: BLE001 - other keys than last time: new buffers below
                pass
        # New or changed structure (e.g. optimizer state created lazily): new buffers. A shape
        # change must never reach copy_(), which would broadcast silently.
        self._buffers, self._signature = None, None
        self._buffers = _create_cpu_state_dict(state)
        self._signature = signature
        return _copy_state_dict(state, self._buffers, type_check=False)

    def release(self) -> None:
        self._buffers, self._signature = None, None


def _async_available() -> bool:
    try:
        from torch.distributed import _state_dict_utils
    except ImportError:
        return False
    return (hasattr(dcp, "async_save") and hasattr(_state_dict_utils, "_copy_state_dict")
            and hasattr(_state_dict_utils, "_create_cpu_state_dict"))


@dataclass
class _Save:
    step: int
    final: Path
    partial: Path
    keep: Path | None
    mode: str  # "async" or "sync"
    scan_s: float = 0.0
    stage_s: float = 0.0
    launch_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    future: Any = None
    launched_at: float = 0.0
    done_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark_done(self, _future=None) -> None:
        with self.lock:
            if self.done_at is None:
                self.done_at = time.perf_counter()


class Checkpointer:
    """Save, rotate, find and load checkpoints under `directory`.

    Every method that writes is collective: all ranks call it at the same point.

    * ``save(step, state, keep=None) -> Path``: refuse a non-finite state, write it (or start
      writing it, with ``async_save``), return the step directory it will have;
    * ``finalize() -> dict | None``: complete the pending async save (wait for every rank's
      write, rename, rotate); a no-op without one. Call before reading the files and before exit;
    * ``close()``: finalize, then free the staging buffers and the async group (end of training);
    * ``has_step(step)``: whether `step` is saved or being saved (use it to avoid saving twice);
    * ``latest()``, ``complete_checkpoints()``: complete checkpoints only, never a pending one;
    * ``clean_partial()``, ``load(path, state)``.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, async_save: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.last_stats: dict | None = None  # timings of the last completed save
        self.totals = {"saves": 0, "blocking_s": 0.0, "write_s": 0.0, "saved_s": 0.0}  # all completed saves
        self._pending: _Save | None = None
        self._group = None  # gloo group for DCP's background collectives, created once
        self._stager = _Stager()

    # ------------------------------------------------------------------ finding
    def complete_checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    @property
    def pending_step(self) -> int | None:
        """The step of the async save still being written (not yet finalized), if any."""
        return self._pending.step if self._pending else None

    def has_step(self, step: int) -> bool:
        """`step` is the latest complete checkpoint or the pending async save."""
        if self.pending_step == step:
            return True
        latest = self.latest()
        return latest is not None and latest.name == step_dir_name(step)

    def clean_partial(self) -> None:
        """Remove leftovers of interrupted saves (rank 0, before anyone saves)."""
        self.finalize()
        if _rank() == 0 and self.directory.is_dir():
            for p in self.directory.glob("*.partial"):
                log.warning("removing incomplete checkpoint %s (an earlier save was interrupted)", p)
                shutil.rmtree(p, ignore_errors=True)
        _agree(None)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: dict, keep: Path | None = None) -> Path:
        """Write `state` as step_<step>; rotation keeps the last `keep_last` and `keep` (the
        best checkpoint, if any). Finalizes the previous async save first. Raises RunError on
        every rank, writing nothing, if any rank's state holds NaN/Inf; raises RunError if the
        write fails for an OS reason (disk full, read-only...)."""
        self.finalize()
        final = self.directory / step_dir_name(step)
        job = _Save(step, final, final.with_name(final.name + ".partial"), keep,
                    "async" if self.async_save else "sync")
        t0 = time.perf_counter()
        if _rank() == 0:
            shutil.rmtree(job.partial, ignore_errors=True)  # a stale one of a failed save
        try:
            bad = first_non_finite(state)
            bad_msg = None if bad is None else f"{bad} holds NaN/Inf"
        except Exception as e:  # noqa: BLE001 - agreed below, so no rank is left waiting
            bad_msg = f"the state could not be checked for NaN/Inf ({type(e).__name__}: {e})"
        failed = _first_failure(_agree(bad_msg))  # also the barrier after the stale-partial removal
        job.scan_s = time.perf_counter() - t0
        if failed is not None:
            rank, what = failed
            raise RunError(f"refusing to write checkpoint {final.name}: {what} (rank {rank}); "
                           f"{self._previous_text()}")
        if job.mode == "async" and not _async_available():
            log.warning("checkpoint.async_save: DCP async save is not available in torch %s; saving "
                        "synchronously", torch.__version__)
            self.async_save = False
            job.mode = "sync"
        if job.mode == "async":
            staged = self._stage_all_ranks(job, state)
            if staged is not None and self._launch(job, staged):
                self._pending = job
                return final
            job.mode = "sync"
        self._write_sync(job, state)
        return final

    def _stage_all_ranks(self, job: _Save, state: dict) -> dict | None:
        t0 = time.perf_counter()
        staged, error = None, None
        try:
            staged = self._stager.stage(state)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fall back to a synchronous save
            self._stager.release()
            error = f"{type(e).__name__}: {e}"
        failed = _first_failure(_agree(error))
        job.stage_s = time.perf_counter() - t0
        if failed is not None:
            log.warning("checkpoint %s: could not stage the state for an async save (rank %d: %s); saving "
                        "synchronously", job.final.name, *failed)
            return None
        return staged

    def _launch(self, job: _Save, staged: dict) -> bool:
        t0 = job.launched_at = time.perf_counter()
        try:
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            result = dcp.async_save(staged, storage_writer=_PreStagedWriter(job.partial),
                                    process_group=self._group)
        except Exception as e:  # noqa: BLE001 - same code and arguments on every rank
            log.warning("checkpoint.async_save: DCP async save failed to start (%s: %s); saving "
                        "synchronously from now on", type(e).__name__, e)
            self.async_save = False
            return False
        job.future = getattr(result, "upload_completion", result)  # AsyncSaveResponse in newer torch
        job.future.add_done_callback(job.mark_done)
        job.launch_s = time.perf_counter() - t0
        return True

    def _write_sync(self, job: _Save, state: dict) -> None:
        t0 = time.perf_counter()
        failure: BaseException | None = None
        try:
            dcp.save(state, storage_writer=FileSystemWriter(job.partial))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - mapped in _commit
            failure = e
        job.write_s = time.perf_counter() - t0
        self._commit(job, failure)

    def finalize(self) -> dict | None:
        """Complete the pending async save: wait until every rank's files are written, then rank
        0 renames step_N.partial to step_N and rotates. Returns its timings (see `last_stats`),
        or None when nothing was pending. Collective. Raises RunError if the write failed."""
        job, self._pending = self._pending, None
        if job is None:
            return None
        t0 = time.perf_counter()
        failure: BaseException | None = None
        try:
            job.future.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - mapped in _commit
            failure = e
        job.mark_done()
        job.wait_s = time.perf_counter() - t0
        job.write_s = job.done_at - job.launched_at
        self._commit(job, failure)
        return self.last_stats

    wait = finalize

    def close(self) -> dict | None:
        """Finalize the pending save, then release the staging buffers and the async process
        group. Collective; call it once at the end of training (before the process group is
        destroyed). The Checkpointer can still save afterwards (it makes new ones)."""
        stats = self.finalize()
        self._stager.release()
        if self._group is not None:
            group, self._group = self._group, None
            if dist.is_initialized():
                dist.destroy_process_group(group)
        return stats

    def _commit(self, job: _Save, failure: BaseException | None) -> None:
        """Agree on the write, then rename and rotate (rank 0), then agree on that."""
        t0 = time.perf_counter()
        failed = _first_failure(_agree(_describe_failure(failure)))
        if failed is not None:
            if _rank() == 0:
                shutil.rmtree(job.partial, ignore_errors=True)
            _agree(None)  # the partial directory is gone before anyone goes on
            raise self._write_error(job, failed, failure)
        error = None
        if _rank() == 0:
            try:
                if job.final.exists():
                    shutil.rmtree(job.final)
                job.partial.rename(job.final)
                _fsync_dir(self.directory)
            except OSError as e:
                error = (0, "OSError", e.errno, _reason(e))
                shutil.rmtree(job.partial, ignore_errors=True)
            else:
                self._rotate(job.keep)
        failed = _first_failure(_agree(error))
        if failed is not None:
            raise self._write_error(job, failed, None)
        commit_s = time.perf_counter() - t0
        if job.mode == "async":
            blocking = job.scan_s + job.stage_s + job.launch_s + job.wait_s + commit_s
        else:
            blocking = job.scan_s + job.write_s + commit_s
        # What a synchronous save of the same state would have blocked for: scan, write, commit.
        sync_equivalent = job.scan_s + job.write_s + commit_s
        self.last_stats = {"step": job.step, "path": str(job.final), "mode": job.mode,
                           "scan_s": job.scan_s, "stage_s": job.stage_s, "write_s": job.write_s,
                           "wait_s": job.wait_s, "commit_s": commit_s, "blocking_s": blocking,
                           "saved_s": sync_equivalent - blocking}
        for key in ("blocking_s", "write_s", "saved_s"):
            self.totals[key] += self.last_stats[key]
        self.totals["saves"] += 1
        if job.mode == "async":
            log.info("checkpoint %s complete: written in %.2f s in the background, training blocked %.2f s "
                     "(%.2f s saved)", job.final.name, job.write_s, blocking, sync_equivalent - blocking)

    def _rotate(self, keep: Path | None) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            if keep is None or old.name != keep.name:
                shutil.rmtree(old, ignore_errors=True)

    def _previous_text(self) -> str:
        latest = self.latest()
        if latest is None:
            return "no earlier checkpoint exists"
        return f"the previous checkpoint {latest.name} is intact"

    def _write_error(self, job: _Save, failed: tuple[int, Any], failure: BaseException | None) -> BaseException:
        """An OS failure (full disk, read-only, permissions) is the user's to fix: a one-line
        RunError. Anything else inside DCP is a bug, not bad input: a RuntimeError with its cause
        chained, so the traceback that shows it is kept."""
        agreed_rank, (origin, kind, code, text) = failed
        rank = agreed_rank if origin is None else origin
        if kind == "OSError":
            fix = ("free space there or choose another checkpoint.dir" if code == errno.ENOSPC
                   else "make it writable or choose another checkpoint.dir")
            return RunError(f"could not write checkpoint {job.final.name} in {self.directory}: {text} (rank {rank}); "
                            f"{fix}; {self._previous_text()}")
        error = RuntimeError(f"writing checkpoint {job.final.name} in {self.directory} failed on rank {rank}: "
                             f"{kind}: {text}")
        error.__cause__ = failure
        return error

    # ------------------------------------------------------------------ loading
    @staticmethod
    def load(path: str | Path, state: dict) -> dict:
        """Fill `state` in place from the checkpoint (only the keys `state` has)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no DCP .metadata); pass a "
                                    f"step_<N> directory or the checkpoints directory")
        dcp.load(state, checkpoint_id=str(path))
        return state


def _describe_failure(failure: BaseException | None) -> tuple[int | None, str, int | None, str] | None:
    """(rank it happened on or None, kind, errno, text) of a failed write, picklable. DCP gathers
    every rank's exception of a save into one CheckpointException raised on all ranks (so each
    rank describes the same failure); an OSError anywhere in it is reported first."""
    if failure is None:
        return None
    causes: list[tuple[int | None, BaseException]] = []
    if isinstance(failure, CheckpointException):
        causes = [(rank, exc) for rank, (exc, _tb) in sorted(failure.failures.items())]
    causes = causes or [(None, failure)]
    for rank, exc in causes:
        seen, depth = exc, 0
        while seen is not None and depth < 8:  # an OSError may be the cause of what DCP saw
            if isinstance(seen, OSError):
                return rank, "OSError", seen.errno, _reason(seen)
            seen, depth = seen.__cause__ or seen.__context__, depth + 1
    rank, first = causes[0]
    text = str(first).splitlines()[0] if str(first) else ""
    return rank, type(first).__name__, None, text


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as is; `<checkpoints>/best`: the best one (checkpoint.keep_best records
    it in best.json); or the latest complete one inside a checkpoints directory."""
    path = Path(path)
    if is_complete(path):
        return path
    if path.name == "best" and not path.exists():
        record = path.parent / "best.json"
        if not record.is_file():
            raise FileNotFoundError(f"{path}: no best.json in {path.parent}; train with checkpoint.keep_best = true "
                                    f"and eval.best_metric, or pass a step_<N> directory")
        best = path.parent / Path(json.loads(record.read_text())["checkpoint"]).name
        if not is_complete(best):
            raise FileNotFoundError(f"{best}: the best checkpoint named in {record} is not complete (deleted?); "
                                    f"pass another step_<N> directory")
        return best
    latest = Checkpointer(path).latest()
    if latest is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint here (expected step_<N>/ with a .metadata file)")
    return latest
