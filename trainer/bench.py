"""`rectrain bench`: end-to-end training throughput, where a step's time goes, peak memory, and
the reader's speed against raw pyarrow decode. See README, Benchmarks.

One worker (a rank) builds the model, optimizer and Parquet stream exactly as `rectrain train`
does (the Trainer's constructor) and runs two timed phases after `warmup` untimed steps:

* throughput: `steps` production steps (`Trainer._steps`: the plain loop on CPU,
  TrainPipelineSparseDist on GPU), timed as a whole; the only instrumentation is a clock read
  around `next(batches)` (data wait). This gives `samples_per_s`.
* breakdown: `steps` more steps of the plain loop with stage timers. On CPU, nothing is
  asynchronous except gloo's collectives, which the timers wait for where they are started;
  on GPU every timer boundary synchronises the device. The stages are exclusive wall time:
  data (waiting for the next batch), input all-to-all (the sharded modules' `input_dist` and
  its waits), embedding forward (lookup + pooled-embedding all-to-all), dense forward (the rest
  of forward: MLPs, interaction, loss, the NaN-guard all-reduce), embedding backward (from the
  gradient reaching the pooled embeddings to the end of the lookup kernels' backward, which also
  applies the fused row-wise update; all-reduce time inside it removed), gradient all-reduce
  (DDP's buckets, run synchronously by a comm hook in this phase), dense backward (the rest of
  backward), optimizer (LR schedule, zero_grad, clipping, dense step). `other` is the rest of
  the step (Python glue, cursor bookkeeping).
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from contextlib import contextmanager, nullcontext
from itertools import islice
from statistics import median
from pathlib import Path
from typing import Callable, Iterator

STAGES = ("data", "input_a2a", "emb_fwd", "dense_fwd", "emb_bwd", "grad_allreduce", "dense_bwd", "optimizer")
STAGE_TITLES = {
    "data": "data (reader + batch build wait)",
    "input_a2a": "input all-to-all",
    "emb_fwd": "embedding forward (lookup + output a2a)",
    "dense_fwd": "dense forward (+ loss)",
    "emb_bwd": "embedding backward + fused update",
    "grad_allreduce": "gradient all-reduce",
    "dense_bwd": "dense backward",
    "optimizer": "optimizer (dense)",
    "other": "other",
}
BENCH_META = "bench_meta.json"
# Row groups of the size `rectrain data criteo` writes by default (its --row-group-rows); the
# README gives the reader's numbers for 8,192-row groups too.
BENCH_ROW_GROUP_ROWS = 65536
PEER_LINE = re.compile(r"peer dlrm_main samples/s\s+([0-9.eE+]+)")


# ------------------------------------------------------------------------------------ data


def ensure_bench_data(path: str | Path, rows: int, num_embeddings: int, row_group_rows: int) -> bool:
    """Write the bench's synthetic Parquet under `path` unless it is there with the same shape;
    True when written."""
    from data.synth import write_bench_data

    path = Path(path)
    meta = {"rows": rows, "num_embeddings": num_embeddings, "ids_per_feature": 1,
            "row_group_rows": row_group_rows}
    marker = path / BENCH_META
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return False
    for old in path.glob("part-*.parquet"):
        old.unlink()
    write_bench_data(path, rows, num_embeddings, row_group_rows=row_group_rows)
    marker.write_text(json.dumps(meta) + "\n")
    return True


def bench_num_embeddings(cfg) -> int:
    return max(t.num_embeddings for t in cfg.model.tables)


# ------------------------------------------------------------------------------------ timing


class _Clock:
    """Wall clock; on GPU, `now()` synchronises the device first (bench breakdown only)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else None

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()


class _Done:
    """An awaitable whose value is already there (the timed input_dist waited for it)."""

    def __init__(self, value) -> None:
        self.value = value

    def wait(self):
        return self.value


class StageTimer:
    """Accumulates exclusive stage times of the breakdown phase; installs the hooks."""

    def __init__(self, model, device, profile: bool = False) -> None:
        self.clock = _Clock(device)
        self.totals = {s: 0.0 for s in STAGES}
        self.active = False
        self.profile = profile
        self._emb_start: float | None = None
        self._emb_end: float | None = None
        self._allreduce: list[tuple[float, float]] = []
        self._install(model)

    # -- hooks
    def _install(self, model) -> None:
        from torchrec.distributed.types import ShardedModule

        self.sharded = [m for m in model.modules() if isinstance(m, ShardedModule)]
        for m in self.sharded:
            m.input_dist = self._timed_input_dist(m.input_dist)
            m.compute_and_output_dist = self._timed_compute(m.compute_and_output_dist)
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
        for m in self.ddp:
            m.register_comm_hook(None, self._comm_hook)

    def _range(self, name: str):
        if not self.profile:
            return nullcontext()
        from torch.autograd.profiler import record_function

        return record_function(f"## bench {name} ##")

    def _timed_input_dist(self, original: Callable):
        def input_dist(ctx, *args, **kwargs):
            if not self.active:
                return original(ctx, *args, **kwargs)
            with self._range("input_a2a"):
                t0 = self.clock.now()
                value = original(ctx, *args, **kwargs).wait().wait()
                self.totals["input_a2a"] += self.clock.now() - t0
            return _Done(_Done(value))
        return input_dist

    def _timed_compute(self, original: Callable):
        def compute_and_output_dist(ctx, dist_input):
            if not self.active:
                return original(ctx, dist_input)
            with self._range("emb_fwd"):
                t0 = self.clock.now()
                out = original(ctx, dist_input)
                out = out.wait() if hasattr(out, "wait") else out
                self.totals["emb_fwd"] += self.clock.now() - t0
            self._watch_backward(out)
            return out
        return compute_and_output_dist

    def _watch_backward(self, out) -> None:
        """Stamp when the gradient reaches the pooled embeddings and when the last node behind
        them (the lookup kernels' backward, which applies the fused update) has run."""
        values = out.values() if hasattr(out, "values") and callable(out.values) else out
        node = getattr(values, "grad_fn", None)
        if node is None:
            return

        def start(*_):
            t = self.clock.now()
            self._emb_start = t if self._emb_start is None else min(self._emb_start, t)

        def end(*_):
            t = self.clock.now()
            self._emb_end = t if self._emb_end is None else max(self._emb_end, t)

        node.register_prehook(start)
        seen, todo, last = set(), [node], []
        while todo:
            n = todo.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            nexts = [f for f, _ in n.next_functions if f is not None]
            if not nexts:
                last.append(n)
            todo += nexts
        for n in last or [node]:
            n.register_hook(end)

    def _comm_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        fut = default_hooks.allreduce_hook(None, bucket)
        if not self.active:
            return fut
        with self._range("grad_allreduce"):
            t0 = self.clock.now()
            fut.wait()
            t1 = self.clock.now()
        self._allreduce.append((t0, t1))
        self.totals["grad_allreduce"] += t1 - t0
        return fut

    # -- one step
    def backward_split(self, bwd_start: float, bwd_end: float) -> None:
        """Split one backward [bwd_start, bwd_end] into embedding / all-reduce / dense parts."""
        reduce = sum(b - a for a, b in self._allreduce)
        emb = 0.0
        if self._emb_start is not None and self._emb_end is not None:
            lo, hi = self._emb_start, self._emb_end
            inside = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in self._allreduce)
            emb = max(0.0, hi - lo - inside)
        self.totals["emb_bwd"] += emb
        self.totals["dense_bwd"] += max(0.0, bwd_end - bwd_start - emb - reduce)
        self._emb_start = self._emb_end = None
        self._allreduce = []


def _timed_batches(batches: Iterator, clock: Callable[[], float], sink: dict, key: str = "data"):
    it = iter(batches)
    while True:
        t0 = clock()
        batch = next(it, None)
        sink[key] = sink.get(key, 0.0) + clock() - t0
        if batch is None:
            return
        yield batch


def _batches_forever(trainer) -> Iterator:
    """The rank's batches epoch after epoch (every rank runs the same number of steps)."""
    from trainer.distributed import all_reduce_max
    from trainer.loader import close_loader, make_loader, padded_batches

    stream, epoch = trainer.train_stream, 0
    loader = make_loader(stream, trainer.ctx.device, trainer.cfg.data.prefetch_factor, persistent=True)  # as fit()
    try:
        while True:
            stream.set_epoch(epoch)
            steps = all_reduce_max(stream.remaining_batches(), trainer.ctx.device)
            yield from padded_batches(loader, steps, stream)
            epoch += 1
    finally:
        close_loader(loader)


def synthetic_batches(schema, batch_size: int, device, pool: int = 8, seed: int = 0) -> Iterator:
    """Batches made on `device` up front and cycled: one uniform id per feature over its table,
    normal dense features, 0/1 labels, like TorchRec's random DLRM batches. Without the reader
    and the host-to-device copy, the bench measures the model step alone."""
    import itertools

    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from data.batch import Batch

    g = torch.Generator(device=device).manual_seed(seed)
    made = []
    for _ in range(pool):
        ids = [torch.randint(0, f.num_embeddings, (batch_size,), generator=g, device=device) for f in schema.features]
        sparse = KeyedJaggedTensor(keys=schema.feature_names, values=torch.cat(ids),
                                   lengths=torch.ones(batch_size * len(ids), dtype=torch.int32, device=device))
        labels = torch.randint(0, 2, (batch_size, len(schema.label_columns)), generator=g, device=device).float()
        made.append(Batch(dense=torch.randn(batch_size, schema.num_dense, generator=g, device=device), sparse=sparse,
                          labels=labels, weights=torch.ones(batch_size, device=device), slot=0))
    return itertools.cycle(made)


def _status_mb(pid: int | str, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def current_rss_mb() -> tuple:
    """Memory now, MiB: this process's and its DataLoader workers' summed resident memory
    (VmRSS); the same for anonymous memory alone (RssAnon: the rest is mapped files, such as the
    Parquet pages a worker reads and the libraries); and this process's C heap in use
    (`heap_in_use_mb`, None where unknown), which free memory the allocator keeps does not count."""
    from trainer.commands.launch import child_pids
    from trainer.host import heap_in_use_mb

    children = child_pids(os.getpid())
    return (_status_mb("self", "VmRSS"), sum(_status_mb(pid, "VmRSS") for pid in children),
            _status_mb("self", "RssAnon"), sum(_status_mb(pid, "RssAnon") for pid in children), heap_in_use_mb())


def rss_report(samples: list[tuple]) -> dict:
    """(step, main MiB, workers MiB[, main anonymous MiB, workers anonymous MiB[, heap in use
    MiB or None]]) samples -> first/last and slopes (MiB per 1,000 steps)."""
    def series(k: int) -> list[tuple[int, float]]:
        return [(s[0], s[k]) for s in samples if len(s) > k and s[k] is not None]

    main, workers, main_anon, workers_anon, heap = series(1), series(2), series(3), series(4), series(5)
    return {"samples": len(samples), "every_steps": samples[0][0] if samples else 0,
            "first_mb": samples[0][1] if samples else None, "last_mb": samples[-1][1] if samples else None,
            "slope_mb_per_1k_steps": rss_slope(main),
            "workers_first_mb": samples[0][2] if samples else None, "workers_last_mb": samples[-1][2] if samples else None,
            "workers_slope_mb_per_1k_steps": rss_slope(workers),
            "anon_slope_mb_per_1k_steps": rss_slope(main_anon),
            "workers_anon_slope_mb_per_1k_steps": rss_slope(workers_anon),
            "heap_first_mb": heap[0][1] if heap else None, "heap_last_mb": heap[-1][1] if heap else None,
            "heap_slope_mb_per_1k_steps": rss_slope(heap)}


def rss_slope(samples: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (step, RSS MiB) over the second half of the samples (the first half
    still fills allocator caches), in MiB per 1,000 steps; None with fewer than 4 samples."""
    tail = samples[len(samples) // 2:]
    if len(tail) < 2 or len(samples) < 4:
        return None
    n = len(tail)
    mx = sum(x for x, _ in tail) / n
    my = sum(y for _, y in tail) / n
    var = sum((x - mx) ** 2 for x, _ in tail)
    return 1000.0 * sum((x - mx) * (y - my) for x, y in tail) / var if var else None


def peak_rss_mb() -> dict:
    """This process's peak RSS and its DataLoader workers' (VmHWM), MiB."""
    from trainer.commands.launch import child_pids

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    workers = sum(_status_mb(pid, "VmHWM") for pid in child_pids(os.getpid()))
    return {"main": round(own, 1), "workers": round(workers, 1)}


def run_worker(cfg, steps: int, warmup: int, profile_dir: str | None = None, source: str = "parquet",
               rss_every: int = 0, threads: int = 0, breakdown_steps: int = 0) -> dict | None:
    """Run the bench on this rank; the result on rank 0 (None elsewhere). `source="device"`:
    batches made on the device instead of read from Parquet. `rss_every`: sample resident memory
    every that many throughput steps and report its slope. `threads`: intra-op threads (0: as set).
    `breakdown_steps`: steps of the instrumented phase (0: `steps`)."""
    import torch

    from trainer.distributed import all_gather_objects
    from trainer.host import release_freed_memory
    from trainer.train import Trainer

    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(cfg)
    ctx = trainer.ctx
    timer = StageTimer(trainer.model, ctx.device, profile=bool(profile_dir))
    trainer.model.train()
    batches = (synthetic_batches(trainer.schema, cfg.data.batch_size, ctx.device, seed=cfg.train.seed + ctx.rank)
               if source == "device" else _batches_forever(trainer))
    global_batch = cfg.data.batch_size * ctx.world_size

    # warm-up (untimed): allocations, first collectives, the DataLoader's first prefetches
    for _ in trainer._steps(islice(batches, warmup)):
        pass

    # phase 1: throughput, production loop
    clock = _Clock(ctx.device)
    waits: dict = {}
    _barrier(ctx)
    rss: list[tuple[int, float, float]] = []
    t0 = clock.now()
    n = 0
    for _ in trainer._steps(_timed_batches(islice(batches, steps), time.perf_counter, waits)):
        n += 1
        if rss_every and n % rss_every == 0:  # before a release: the most the step's memory reaches
            rss.append((n, *current_rss_mb()))
        trainer.release_memory_if_due(n)  # as training does (train.release_freed_memory_every)
    elapsed = clock.now() - t0
    _barrier(ctx)

    # phase 2: breakdown, instrumented plain loop
    prof = _profiler(profile_dir, ctx.rank) if profile_dir else nullcontext()
    timer.active = True
    step_total = 0.0
    parts = breakdown_steps or steps
    with prof as p:
        feed = _timed_batches(islice(batches, parts), timer.clock.now, timer.totals)
        for _ in range(parts):
            s0 = timer.clock.now()
            with timer._range("data"):
                batch = next(feed)
                if ctx.device.type == "cuda":  # the host-to-device copy counts as data
                    d0 = timer.clock.now()
                    batch = batch.to(ctx.device, non_blocking=True)
                    timer.totals["data"] += timer.clock.now() - d0
            with timer._range("optimizer"):
                o0 = timer.clock.now()
                trainer.schedule.apply(trainer.state.step)
                trainer.optimizer.zero_grad()
                opt = timer.clock.now() - o0
            inner = timer.totals["input_a2a"] + timer.totals["emb_fwd"]
            f0 = timer.clock.now()
            with timer._range("forward"):
                loss, _ = trainer.model(batch)
            f1 = timer.clock.now()
            with timer._range("backward"):
                trainer.precision.backward(loss)
            b1 = timer.clock.now()
            with timer._range("optimizer"):
                trainer.precision.step(trainer.optimizer)
            s1 = timer.clock.now()
            timer.totals["optimizer"] += opt + (s1 - b1)
            inner = timer.totals["input_a2a"] + timer.totals["emb_fwd"] - inner
            timer.totals["dense_fwd"] += max(0.0, (f1 - f0) - inner)
            timer.backward_split(f1, b1)
            step_total += s1 - s0
            if p is not None and hasattr(p, "step"):
                p.step()
    timer.active = False
    peaks = all_gather_objects(peak_rss_mb())
    per_step = {k: v / parts * 1000.0 for k, v in timer.totals.items()}
    step_ms = step_total / parts * 1000.0
    per_step["other"] = max(0.0, step_ms - sum(per_step.values()))
    result = {
        "samples_per_s": global_batch * n / elapsed,
        "steps": n, "warmup": warmup, "world_size": ctx.world_size, "global_batch": global_batch,
        "elapsed_s": elapsed, "step_ms": elapsed / n * 1000.0,
        "data_wait_ms": waits.get("data", 0.0) / n * 1000.0,
        "breakdown_step_ms": step_ms, "breakdown_steps": parts,
        "breakdown_ms": {k: round(v, 3) for k, v in per_step.items()},
        "peak_rss_mb": peaks,
        "embedding_share": round((per_step["input_a2a"] + per_step["emb_fwd"] + per_step["emb_bwd"]) / step_ms, 4)
        if step_ms else 0.0,
        "source": source,
        "device": str(ctx.device), "torch_threads": torch.get_num_threads(),
        "num_workers": cfg.data.num_workers,
        "precision": {"dense": cfg.precision.dense, "embeddings": cfg.precision.embeddings},
    }
    if rss_every:
        report = rss_report(rss)
        # What the rank holds at the end, and what of it was free memory the allocator kept
        # (train.keep_freed_memory keeps it on purpose): growth that trimming gives back is no leak.
        report["end_mb"] = _status_mb("self", "VmRSS")
        report["after_trim_mb"] = _status_mb("self", "VmRSS") if release_freed_memory() else None
        result["rss_over_steps"] = all_gather_objects(report)
    if profile_dir:
        result["profile_dir"] = str(profile_dir)
    trainer.logger.close()
    return result if ctx.is_main else None


def _barrier(ctx) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()


def _profiler(directory: str, rank: int):
    import torch
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, on_trace_ready=tensorboard_trace_handler(directory, worker_name=f"rank{rank}"),
                   record_shapes=False, with_stack=False)


# ------------------------------------------------------------------------------------ peer


def parse_peer_output(text: str) -> float:
    """samples/s from peer_dlrm.sh's line "peer dlrm_main samples/s N"."""
    found = PEER_LINE.findall(text)
    if not found:
        raise ValueError(f"no 'peer dlrm_main samples/s N' line in the peer's output: {text.strip()[-200:]!r}")
    return float(found[-1])


def compare_rounds(run_ours: Callable[[], dict], run_peer: Callable[[], str], rounds: int,
                   parse: Callable[[str], float] = parse_peer_output) -> dict:
    """ours, peer, ours, peer, ... (`rounds` of each); the ratio of the medians (and of the bests)."""
    ours, peer, results = [], [], []
    for _ in range(rounds):
        r = run_ours()
        results.append(r)
        ours.append(r["samples_per_s"])
        peer.append(parse(run_peer()))
    return {"ours_samples_per_s": ours, "peer_samples_per_s": peer, "ours_median": median(ours),
            "ratio": median(ours) / median(peer), "ratio_best": max(ours) / max(peer), "results": results}


# ------------------------------------------------------------------------------------ data-only


def _raw_decode_pass(files: list, columns: list[str]) -> int:
    """One raw pyarrow pass over the files: read + to numpy of every column, one thread; its
    rows. `files`: paths, read with pq.read_table's defaults; or ParquetFiles (`_mapped_checked`),
    read as they were opened."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        if isinstance(f, str):
            table = pq.read_table(f, columns=columns, use_threads=False)
        else:
            table = f.read(columns=columns, use_threads=False)
        for col in table.columns:
            if pa.types.is_list(col.type):
                np.asarray(col.combine_chunks().flatten().to_numpy(zero_copy_only=False))
            else:
                col.to_numpy()
        rows += table.num_rows
    return rows


def _mapped_checked(files: list[str]) -> list:
    """The files opened as the reader opens them: memory-mapped once (and kept mapped), page
    checksums verified."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return [pq.ParquetFile(pa.memory_map(f), page_checksum_verification=True) for f in files]


def _reader_pass(stream, epoch: int) -> int:
    """One pass of the stream in this process (Parquet -> Batch); its rows."""
    stream.set_epoch(epoch)
    return sum(batch.batch_size for batch in stream)


def _timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - t0


def _per_core_rounds(stream, unshuffled, files: list[str], columns: list[str], rounds: int) -> dict:
    """Reader and raw decode passes interleaved (the order rotating each round), so a slower
    stretch of a shared machine lands on both sides: rows/s of each side (median over rounds),
    and the reader's ratios to each raw variant as the median of the rounds' ratios (and as
    best over best). `unshuffled`: the same reader without the shuffle buffer, to show what
    shuffling costs."""
    mapped = _mapped_checked(files)
    sides = {
        "reader": lambda r: _reader_pass(stream, r),
        "reader_unshuffled": lambda r: _reader_pass(unshuffled, r),
        "raw": lambda r: _raw_decode_pass(files, columns),
        "raw_mapped_checked": lambda r: _raw_decode_pass(mapped, columns),
    }
    names = list(sides)
    for side in sides.values():  # warm: files opened and mapped, page cache filled
        side(0)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        turn = r % len(names)
        for k in names[turn:] + names[:turn]:
            rows, seconds = _timed(lambda: sides[k](r))
            rates[k].append(rows / seconds)
    out = {f"{k}_rows_per_s": median(v) for k, v in rates.items()}
    for raw in ("raw", "raw_mapped_checked"):
        pairs = [a / b for a, b in zip(rates["reader"], rates[raw])]
        out[f"reader_vs_{raw}"] = median(pairs)
        out[f"reader_vs_{raw}_rounds"] = pairs
        out[f"reader_vs_{raw}_best"] = max(rates["reader"]) / max(rates[raw])
    return out


def _loader_rates(stream, min_seconds: float, prefetch_factor: int) -> dict:
    """Rows/s the main process receives from the stream's DataLoader workers, over whole epochs
    until `min_seconds`: steady, while every worker is delivering (from the last worker's first
    batch to the first worker's last: what the middle of a long epoch sees), and with each
    epoch's start and end (the workers persist across epochs, as in training, but each epoch's
    first batch waits for its first row group's decode; on a small dataset that is a large part
    of an epoch; the first epoch also forks the workers)."""
    import torch

    from trainer.loader import close_loader, make_loader

    loader = make_loader(stream, torch.device("cpu"), prefetch_factor, persistent=True)
    try:
        return _epoch_rates(loader, stream, min_seconds)
    finally:
        close_loader(loader)


def _epoch_rates(loader, stream, min_seconds: float) -> dict:
    """`_loader_rates`, measured on an open loader; with the CPU each batch cost the workers and
    the main process (`_cpu_accounting`)."""
    rows = steady_rows = batches = 0
    elapsed = steady = start = 0.0
    epoch = 0
    main_cpu = time.process_time()
    while epoch == 0 or elapsed < min_seconds:
        stream.set_epoch(epoch)
        t0 = time.perf_counter()
        arrivals = []  # (time, reader slot, rows)
        for batch in loader:
            arrivals.append((time.perf_counter(), batch.slot, batch.batch_size))
        elapsed += time.perf_counter() - t0
        epoch += 1
        if not arrivals:
            continue
        batches += len(arrivals)
        rows += sum(n for _, _, n in arrivals)
        start += arrivals[0][0] - t0
        spans: dict[int, tuple[float, float]] = {}  # reader slot -> (first, last) arrival; times ascend
        for t, slot, _ in arrivals:
            spans[slot] = (spans.get(slot, (t, t))[0], t)
        first = max(a for a, _ in spans.values())
        last = min(b for _, b in spans.values())
        if last > first:
            steady += last - first
            steady_rows += sum(n for t, _, n in arrivals if first < t <= last)
    main_cpu = time.process_time() - main_cpu
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    worker_cpu = [_cpu_seconds(w.pid) for w in workers]
    out = {"steady_rows_per_s": steady_rows / steady if steady else 0.0, "rows_per_s": rows / elapsed,
           "worker_start_ms": 1e3 * start / epoch, "epochs": epoch}
    out.update(_cpu_accounting(batches, rows, main_cpu, None if None in worker_cpu else worker_cpu))
    return out


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process `pid` has used (Linux /proc); None where unreadable."""
    from trainer.commands.launch import proc_stat_fields

    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cpu_accounting(batches: int, rows: int, main_cpu_s: float, worker_cpu_s: list[float] | None) -> dict:
    """Where the delivered rate's ceiling on this machine comes from. Over the measured epochs
    (their starts included) each batch cost its worker `w` ms of CPU and the main process `m`
    ms (receiving it); with N workers on C CPUs the rate can be no more than rows per batch x
    min(C / (w + m), N / w, 1 / m): on a machine with no more CPUs than workers, the main
    process's share of them is the workers' loss, however well the workers scale."""
    if not batches or worker_cpu_s is None or not worker_cpu_s:
        return {"main_cpu_ms_per_batch": 1e3 * main_cpu_s / batches if batches else None,
                "worker_cpu_ms_per_batch": None, "cpu_bound_rows_per_s": None}
    main = main_cpu_s / batches
    worker = sum(worker_cpu_s) / batches
    cpus = usable_cpus()
    per_s = min(cpus / (worker + main), len(worker_cpu_s) / worker if worker else float("inf"),
                1 / main if main else float("inf"))
    return {"main_cpu_ms_per_batch": 1e3 * main, "worker_cpu_ms_per_batch": 1e3 * worker,
            "cpu_bound_rows_per_s": per_s * rows / batches}


def _concurrent_reader_rates(make_stream: Callable, processes: int, min_seconds: float) -> list[float]:
    """Rows/s of each of `processes` forked processes running the in-process reader (one
    core's threads each) at the same time, for at least `min_seconds` after a warm pass: what
    this machine gives N independent readers, the ceiling for N DataLoader workers, which share
    the cores with the main process collecting their batches as well."""
    import gc
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(processes), ctx.SimpleQueue()

    def child() -> None:
        with _one_core():
            stream = make_stream()
            _reader_pass(stream, 0)
            start.wait()
            rows, t0, epoch = 0, time.perf_counter(), 1
            while epoch == 1 or time.perf_counter() - t0 < min_seconds:
                rows += _reader_pass(stream, epoch)
                epoch += 1
            results.put(rows / (time.perf_counter() - t0))

    gc.freeze()  # as trainer/loader.py does for DataLoader workers: a child's collections stay its own
    try:
        children = [ctx.Process(target=child, daemon=True) for _ in range(processes)]
        for c in children:
            c.start()
    finally:
        gc.unfreeze()
    rates = [results.get() for _ in children]
    for c in children:
        c.join()
    return sorted(rates)


@contextmanager
def _one_core():
    import pyarrow as pa
    import torch

    threads, cpus, io = torch.get_num_threads(), pa.cpu_count(), pa.io_thread_count()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        pa.set_cpu_count(cpus)
        pa.set_io_thread_count(io)


def data_only(cfg, workers: list[int] | None = None, rounds: int = 9, min_seconds: float = 3.0) -> dict:
    """Reader rows/s on one core next to raw pyarrow decode of the same files and columns
    (`_per_core_rounds`), and the rows/s 1..N DataLoader workers deliver (`_loader_rates`)."""
    from data.parquet import ParquetStream, list_parquet_files
    from data.schema import Schema
    from trainer.build import build_unsharded_model
    from trainer.host import keep_freed_memory

    if cfg.train.keep_freed_memory:  # as in training, whose workers fork from a tuned process
        keep_freed_memory()
    _, schema = build_unsharded_model(cfg)
    assert isinstance(schema, Schema)
    _, files = list_parquet_files(cfg.data.train_path)

    def stream(num_workers: int, shuffle: bool = True) -> ParquetStream:
        return ParquetStream(cfg.data.train_path, schema, batch_size=cfg.data.batch_size, num_workers=num_workers,
                             shuffle=shuffle, shuffle_buffer_rows=cfg.data.shuffle_buffer_rows, seed=cfg.data.seed)

    with _one_core():
        result = _per_core_rounds(stream(0), stream(0, shuffle=False), files, schema.columns, rounds)
    workers = workers or sorted({1, usable_cpus()})
    scaling = {}
    for w in workers:
        with _one_core():  # the main process only collects; each worker decodes on one core
            scaling[str(w)] = _loader_rates(stream(w), min_seconds, cfg.data.prefetch_factor)
    base = scaling[str(workers[0])]["steady_rows_per_s"] / workers[0]
    for w, rates in scaling.items():
        rates["per_worker_vs_first"] = rates["steady_rows_per_s"] / int(w) / base if base else 0.0
    # The same comparison for independent readers, no DataLoader: how far from linear this
    # machine itself is at each count (on a 2-core machine two busy processes do not each run
    # as fast as one alone).
    first = None
    for w in workers:
        each = _concurrent_reader_rates(lambda: stream(0), w, min_seconds)
        per_process = sum(each) / w
        first = first or per_process
        scaling[str(w)].update({"independent_readers_rows_per_s": each,
                                "independent_per_process_vs_first": per_process / first})
    result.update({"reader_rows_per_s_per_core": result["reader_rows_per_s"],
                   "raw_decode_rows_per_s_per_core": result["raw_rows_per_s"],
                   "reader_vs_raw": result["reader_vs_raw"], "workers": scaling, "rounds": rounds,
                   "files": len(files), "columns": len(schema.columns), "batch_size": cfg.data.batch_size,
                   "rows": sum(p.num_rows for p in stream(0).pieces), "cpus": usable_cpus()})
    return result


# ------------------------------------------------------------------------------------ report


def format_table(result: dict) -> str:
    lines = [f"samples/s (global, after {result['warmup']} warm-up steps, {result['steps']} steps, "
             f"{result['world_size']} rank(s) x batch {result['global_batch'] // result['world_size']}): "
             f"{result['samples_per_s']:,.0f}   step {result['step_ms']:.1f} ms, data wait {result['data_wait_ms']:.1f} ms",
             f"breakdown (instrumented steps, rank 0, ms/step; step {result['breakdown_step_ms']:.1f} ms):"]
    step = result["breakdown_step_ms"] or 1.0
    for key, ms in result["breakdown_ms"].items():
        lines.append(f"  {STAGE_TITLES.get(key, key):<42} {ms:9.2f}  {100 * ms / step:5.1f}%")
    rss = ", ".join(f"rank {r}: {m['main']:.0f} MiB (+{m['workers']:.0f} workers)"
                    for r, m in enumerate(result["peak_rss_mb"]))
    lines.append(f"peak RSS: {rss}")
    lines.append(f"embedding share (input a2a + lookup fwd/bwd): {100 * result.get('embedding_share', 0):.1f}% of the step; "
                 f"batches from {result.get('source', 'parquet')}")
    for r, m in enumerate(result.get("rss_over_steps") or []):
        if m["slope_mb_per_1k_steps"] is not None:
            lines.append(f"RSS over the throughput steps, rank {r}: {m['first_mb']:.0f} -> {m['last_mb']:.0f} MiB, slope "
                         f"{m['slope_mb_per_1k_steps']:+.2f} MiB per 1,000 steps (second half of {m['samples']} "
                         f"samples); workers {m['workers_first_mb']:.0f} -> {m['workers_last_mb']:.0f} MiB, slope "
                         f"{m['workers_slope_mb_per_1k_steps']:+.2f}")
        if m.get("anon_slope_mb_per_1k_steps") is not None:
            trimmed = (f"; at the end {m['end_mb']:.0f} MiB, {m['after_trim_mb']:.0f} after malloc_trim(0)"
                       if m.get("after_trim_mb") is not None else "")
            lines.append(f"  anonymous memory only (heap, tensors): slope {m['anon_slope_mb_per_1k_steps']:+.2f} MiB per "
                         f"1,000 steps, workers {m['workers_anon_slope_mb_per_1k_steps']:+.2f}{trimmed}")
        if m.get("heap_slope_mb_per_1k_steps") is not None:
            lines.append(f"  C heap in use (mallinfo2; what the allocator keeps free is not counted): "
                         f"{m['heap_first_mb']:.0f} -> {m['heap_last_mb']:.0f} MiB, slope "
                         f"{m['heap_slope_mb_per_1k_steps']:+.2f} MiB per 1,000 steps")
    return "\n".join(lines)


def format_data_only(result: dict) -> str:
    lines = [f"one core, {result['rounds']} interleaved rounds over {result['rows']:,} rows "
             f"({result['files']} files, {result['columns']} columns, batch {result['batch_size']:,}); median rows/s:",
             f"  reader (Parquet -> Batch, memory-mapped, page checksums verified) {result['reader_rows_per_s']:>12,.0f}",
             f"  the same reader without the shuffle buffer                        "
             f"{result['reader_unshuffled_rows_per_s']:>12,.0f}",
             f"  raw pyarrow decode (pq.read_table + to_numpy, defaults)           {result['raw_rows_per_s']:>12,.0f}",
             f"  raw, with the reader's I/O (files mapped once, page checksums)    "
             f"{result['raw_mapped_checked_rows_per_s']:>12,.0f}",
             f"reader / raw decode: {result['reader_vs_raw']:.2f} (median of the rounds' ratios; best over best "
             f"{result['reader_vs_raw_best']:.2f}); reader / raw with the reader's I/O: "
             f"{result['reader_vs_raw_mapped_checked']:.2f}",
             f"DataLoader workers ({result['cpus']} CPUs; rows/s delivered to the main process):"]
    for w, r in result["workers"].items():
        lines.append(f"  data.num_workers={w}: {r['steady_rows_per_s']:>12,.0f} steady ({r['per_worker_vs_first']:.2f}x "
                     f"the first count's rate per worker), {r['rows_per_s']:,.0f} with each epoch's start "
                     f"({r['worker_start_ms']:.0f} ms per epoch, {r['epochs']} epochs)")
        if r.get("cpu_bound_rows_per_s"):
            lines.append(f"      CPU per batch: its worker {r['worker_cpu_ms_per_batch']:.2f} ms, the main process "
                         f"{r['main_cpu_ms_per_batch']:.2f} ms: at most {r['cpu_bound_rows_per_s']:,.0f} rows/s on "
                         f"{result['cpus']} CPUs at that cost; with each epoch's start it delivered "
                         f"{r['rows_per_s'] / r['cpu_bound_rows_per_s']:.0%} of that")
    lines.append("the machine's own ceiling: N independent readers (no DataLoader) at once, rows/s each:")
    for w, r in result["workers"].items():
        each = ", ".join(f"{x:,.0f}" for x in r["independent_readers_rows_per_s"])
        lines.append(f"  {w} at once: {each} ({r['independent_per_process_vs_first']:.2f}x the first count's rate "
                     f"per process)")
    return "\n".join(lines)
