"""`rectrain bench`: the JSON line's numbers are consistent (breakdown within the step, samples/s
= steps x global batch / measured time), data-only reports both rates, and --compare-peer
alternates runs and takes the ratio (with a fake peer: the real one is never run here). No timed
assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT


def tiny_config(tmp_path: Path) -> Path:
    """configs/bench_dlrm.toml shrunk: 26 tables x 1,000 x 8, batch 128."""
    text = (ROOT / "configs" / "bench_dlrm.toml").read_text()
    for a, b in [("runs/bench/dlrm_data", str(tmp_path / "data")), ('"runs/bench/dlrm"', f'"{tmp_path / "run"}"'),
                 ("num_embeddings = 100000", "num_embeddings = 1000"), ("embedding_dim = 64", "embedding_dim = 8"),
                 ("[512, 256, 64]", "[16, 8]"), ("[512, 512, 256]", "[16]"), ("batch_size = 2048", "batch_size = 128"),
                 ("shuffle_buffer_rows = 16384", "shuffle_buffer_rows = 1024")]:
        assert a in text
        text = text.replace(a, b)
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _json_line(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_matched_config_shape():
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "bench_dlrm.toml")
    assert len(cfg.model.tables) == 26
    assert {(t.num_embeddings, len(t.features)) for t in cfg.model.tables} == {(100_000, 1)}
    assert cfg.model.embedding_dim == 64 and len(cfg.data.dense_columns) == 13
    assert cfg.data.batch_size == 2048 and cfg.optimizer.embedding == "rowwise_adagrad"
    assert cfg.precision.dense == "bf16"  # the peer's fp32 is --set precision.dense=fp32
    assert cfg.model.arch.dense_arch == [512, 256, 64] and cfg.model.arch.over_arch == [512, 512, 256]


def test_bench_json_is_consistent(tmp_path, capsys):
    from trainer.cli import main

    steps, batch = 4, 128
    assert main(["bench", "--config", str(tiny_config(tmp_path)), "--steps", str(steps), "--warmup", "1",
                 "--rows", "2048"]) == 0
    out = capsys.readouterr().out
    r = _json_line(out)
    assert "samples/s" in out and "gradient all-reduce" in out  # the table
    # the data the bench wrote: one id per feature, ids inside the tables
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "data").glob("*.parquet"))])
    assert table.num_rows == 2048 and not str(table.schema.field("cat_25").type).startswith("list")
    assert max(table.column(f"cat_{i}").to_numpy().max() for i in range(26)) < 1000
    assert r["steps"] == steps and r["global_batch"] == batch
    assert r["samples_per_s"] == pytest.approx(steps * batch / r["elapsed_s"], rel=1e-9)
    parts = r["breakdown_ms"]
    assert set(parts) == {"data", "input_a2a", "emb_fwd", "dense_fwd", "emb_bwd", "grad_allreduce", "dense_bwd",
                          "optimizer", "other"}
    assert all(v >= 0 for v in parts.values())
    assert sum(parts.values()) <= r["breakdown_step_ms"] * (1 + 1e-6) + 5e-3  # parts are rounded to 3 decimals
    # the forward and backward really were measured (not all left in "other")
    assert parts["emb_fwd"] > 0 and parts["dense_fwd"] > 0 and parts["emb_bwd"] > 0 and parts["dense_bwd"] > 0
    assert r["peak_rss_mb"][0]["main"] > 100


def test_profile_writes_a_tensorboard_trace_with_a_range_per_stage(tmp_path, capsys):
    from trainer.cli import main

    trace_dir = tmp_path / "trace"
    assert main(["bench", "--config", str(tiny_config(tmp_path)), "--steps", "2", "--warmup", "1",
                 "--rows", "1024", "--profile", str(trace_dir)]) == 0
    assert _json_line(capsys.readouterr().out)["profile_dir"] == str(trace_dir)
    traces = list(trace_dir.glob("rank0*.pt.trace.json"))
    assert len(traces) == 1  # what `tensorboard --logdir DIR` (PyTorch Profiler) reads
    text = traces[0].read_text()
    for stage in ("data", "input_a2a", "emb_fwd", "forward", "backward", "optimizer"):
        assert f"## bench {stage} ##" in text, stage


def test_device_batches_and_memory_samples(tmp_path, capsys):
    """--synthetic device: batches made up front in the shape of the schema, ids inside each
    table; --rss-every samples memory once per N throughput steps."""
    from trainer.cli import main

    steps, every = 8, 2
    assert main(["bench", "--config", str(tiny_config(tmp_path)), "--steps", str(steps), "--warmup", "1",
                 "--rows", "1024", "--synthetic", "device", "--rss-every", str(every)]) == 0
    out = capsys.readouterr().out
    r = _json_line(out)
    assert r["source"] == "device" and "batches from device" in out
    assert r["samples_per_s"] == pytest.approx(steps * r["global_batch"] / r["elapsed_s"], rel=1e-9)
    mem = r["rss_over_steps"][0]
    assert mem["samples"] == steps // every and mem["every_steps"] == every
    assert mem["first_mb"] > 100 and mem["slope_mb_per_1k_steps"] is not None
    assert mem["anon_slope_mb_per_1k_steps"] is not None and mem["workers_anon_slope_mb_per_1k_steps"] is not None
    # at the end, the rank's resident memory and what is left of it once glibc hands back its free pages
    assert 0 < mem["after_trim_mb"] <= mem["end_mb"] + 1
    assert "anonymous memory only" in out and "after malloc_trim(0)" in out
    from trainer.host import heap_in_use_mb

    if heap_in_use_mb() is not None:  # glibc >= 2.33
        assert 0 < mem["heap_first_mb"] < mem["first_mb"] and mem["heap_slope_mb_per_1k_steps"] is not None
        assert "C heap in use" in out
    shares = r["breakdown_ms"]
    assert r["embedding_share"] == pytest.approx(
        (shares["input_a2a"] + shares["emb_fwd"] + shares["emb_bwd"]) / r["breakdown_step_ms"], abs=2e-3)


def test_synthetic_batches_follow_the_schema():
    import torch

    from data.schema import FeatureSpec, Schema
    from trainer.bench import synthetic_batches

    schema = Schema(label_columns=("label",), dense_columns=("d0", "d1"),
                    features=(FeatureSpec("a", 7), FeatureSpec("b", 3)))
    batches = synthetic_batches(schema, 16, torch.device("cpu"), pool=2)
    first, second, third = next(batches), next(batches), next(batches)
    assert third is first and second is not first  # a pool, cycled
    kjt = first.sparse.to_dict()
    assert first.dense.shape == (16, 2) and first.labels.shape == (16, 1)
    assert set(first.labels.unique().tolist()) <= {0.0, 1.0} and first.weights.sum() == 16
    assert kjt["a"].values().max() < 7 and kjt["b"].values().max() < 3 and kjt["a"].values().min() >= 0
    assert (kjt["a"].lengths() == 1).all() and (kjt["b"].lengths() == 1).all()


def test_rss_slope_is_the_least_squares_slope_of_the_second_half():
    from trainer.bench import rss_report, rss_slope

    # warming up (first half), then a steady 2 MiB per 1,000 steps
    samples = [(100, 500.0), (200, 900.0), (300, 1000.0), (400, 1000.2), (500, 1000.4), (600, 1000.6)]
    assert rss_slope(samples) == pytest.approx(2.0)
    assert rss_slope(samples[:3]) is None
    flat = rss_report([(s, m, 50.0) for s, m in samples])
    assert flat["workers_slope_mb_per_1k_steps"] == pytest.approx(0.0)
    assert flat["anon_slope_mb_per_1k_steps"] is None  # samples without the anonymous part
    # (step, main, workers, main anonymous, workers anonymous): a leak shows in the anonymous
    # slope; mapped file pages (the main total here) may grow without it
    five = rss_report([(x, m, 50.0, 400.0 + x / 100, 40.0) for x, m in samples])
    assert five["slope_mb_per_1k_steps"] == pytest.approx(2.0)
    assert five["anon_slope_mb_per_1k_steps"] == pytest.approx(10.0)
    assert five["workers_anon_slope_mb_per_1k_steps"] == pytest.approx(0.0)
    assert five["heap_slope_mb_per_1k_steps"] is None and five["heap_first_mb"] is None
    # with the C heap in use: its own slope; a sample without it (None) is left out of that series
    six = rss_report([(x, m, 50.0, 400.0, 40.0, 300.0 + x / 200 if x != 600 else None) for x, m in samples])
    assert six["heap_slope_mb_per_1k_steps"] == pytest.approx(5.0)
    assert six["heap_first_mb"] == pytest.approx(300.5) and six["heap_last_mb"] == pytest.approx(302.5)
    assert flat["first_mb"] == 500.0 and flat["last_mb"] == 1000.6 and flat["every_steps"] == 100


def test_data_only_reports_both_rates(tmp_path, capsys):
    from trainer.cli import main

    assert main(["bench", "--config", str(tiny_config(tmp_path)), "--data-only", "--rows", "4096",
                 "--workers", "1,2", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    r = _json_line(out)
    assert r["rows"] == 4096 and r["rounds"] == 3
    for side in ("reader", "reader_unshuffled", "raw", "raw_mapped_checked"):
        assert r[f"{side}_rows_per_s"] > 0
    for raw in ("raw", "raw_mapped_checked"):
        rounds = r[f"reader_vs_{raw}_rounds"]
        assert len(rounds) == 3 and r[f"reader_vs_{raw}"] == pytest.approx(sorted(rounds)[1])  # the median
    assert r["reader_vs_raw_best"] > 0
    assert set(r["workers"]) == {"1", "2"}
    for w, rates in r["workers"].items():
        assert rates["epochs"] >= 1 and rates["worker_start_ms"] > 0
        assert rates["steady_rows_per_s"] > 0 and rates["rows_per_s"] > 0
    assert r["workers"]["1"]["per_worker_vs_first"] == 1.0
    assert r["workers"]["2"]["per_worker_vs_first"] == pytest.approx(
        r["workers"]["2"]["steady_rows_per_s"] / 2 / r["workers"]["1"]["steady_rows_per_s"])
    # the machine's own ceiling: that many independent readers at once, one rate each
    for w, rates in r["workers"].items():
        each = rates["independent_readers_rows_per_s"]
        assert len(each) == int(w) and all(x > 0 for x in each)
    first = r["workers"]["1"]["independent_readers_rows_per_s"][0]
    assert r["workers"]["1"]["independent_per_process_vs_first"] == 1.0
    assert r["workers"]["2"]["independent_per_process_vs_first"] == pytest.approx(
        sum(r["workers"]["2"]["independent_readers_rows_per_s"]) / 2 / first)
    # where each count's ceiling comes from: the CPU its workers and the main process spent per batch
    for w, rates in r["workers"].items():
        worker, main = rates["worker_cpu_ms_per_batch"], rates["main_cpu_ms_per_batch"]
        assert worker > 0 and main > 0
        per_batch_rows = 128  # the tiny config's batch (4,096 rows: 32 full batches an epoch)
        assert rates["cpu_bound_rows_per_s"] == pytest.approx(
            1e3 * per_batch_rows * min(r["cpus"] / (worker + main), int(w) / worker, 1 / main), rel=0.05)
    assert "reader / raw decode:" in out and "data.num_workers=2:" in out and "2 at once:" in out
    assert "CPU per batch: its worker" in out


def test_loader_steady_rate_counts_only_while_every_worker_delivers(monkeypatch):
    """The steady window runs from the last worker's first batch to the first worker's last;
    the rate is the rows that arrived inside it over its length."""
    from types import SimpleNamespace

    import trainer.bench as bench
    import trainer.loader as loader

    # slot 0 delivers at t = 1, 2, 3, 4; slot 1 at t = 2.5, 3.5, 4.5; batches of 10 rows
    arrivals = [(1.0, 0), (2.0, 0), (2.5, 1), (3.0, 0), (3.5, 1), (4.0, 0), (4.5, 1)]
    clock = iter([0.0] + [t for t, _ in arrivals] + [5.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))

    class Stream:
        def set_epoch(self, epoch):
            pass

    monkeypatch.setattr(loader, "make_loader", lambda stream, device, prefetch, persistent=False:
                        [SimpleNamespace(slot=s, batch_size=10) for _, s in arrivals])
    r = bench._loader_rates(Stream(), min_seconds=0.0, prefetch_factor=2)
    # window (2.5, 4.0]: the batches at 3.0, 3.5 and 4.0
    assert r["steady_rows_per_s"] == pytest.approx(30 / 1.5)
    assert r["rows_per_s"] == pytest.approx(70 / 5.0) and r["worker_start_ms"] == pytest.approx(1000.0)
    assert r["epochs"] == 1


def test_cpu_accounting_bounds_the_rate_by_the_scarcest_cpu():
    from trainer.bench import _cpu_accounting, usable_cpus

    cpus = usable_cpus()
    # 100 batches of 1,000 rows; each cost its worker 2 ms and the main process 0.5 ms
    r = _cpu_accounting(100, 100_000, 0.05, [0.1, 0.1])
    assert r["worker_cpu_ms_per_batch"] == pytest.approx(2.0) and r["main_cpu_ms_per_batch"] == pytest.approx(0.5)
    assert r["cpu_bound_rows_per_s"] == pytest.approx(1000 * min(cpus / 2.5e-3, 2 / 2e-3, 1 / 0.5e-3))
    # one worker: its own CPU is the bound whenever there is a second CPU for the main process
    one = _cpu_accounting(100, 100_000, 0.05, [0.2])
    assert one["cpu_bound_rows_per_s"] == pytest.approx(1000 * min(cpus / 2.5e-3, 1 / 2e-3))
    # no readable worker CPU (not Linux, or workers gone): no ceiling claimed
    none = _cpu_accounting(100, 100_000, 0.05, None)
    assert none["cpu_bound_rows_per_s"] is None and none["main_cpu_ms_per_batch"] == pytest.approx(0.5)


def test_cpu_seconds_reads_a_live_process():
    import time as _time

    from trainer.bench import _cpu_seconds

    before = _cpu_seconds(os.getpid())
    t = _time.process_time()
    while _time.process_time() - t < 0.3:
        pass
    after = _cpu_seconds(os.getpid())
    assert after - before == pytest.approx(0.3, abs=0.1)
    assert _cpu_seconds(2 ** 31 - 1) is None  # no such process


def test_parse_peer_output():
    from trainer.bench import parse_peer_output

    assert parse_peer_output("noise\npeer dlrm_main samples/s 12345\n") == 12345.0
    with pytest.raises(ValueError):
        parse_peer_output("Traceback ...")


def test_compare_rounds_alternates_and_takes_the_ratio():
    from trainer.bench import compare_rounds

    calls = []
    ours = iter([{"samples_per_s": 300.0}, {"samples_per_s": 500.0}, {"samples_per_s": 400.0}])
    peers = iter(["peer dlrm_main samples/s 100", "peer dlrm_main samples/s 400", "peer dlrm_main samples/s 200"])

    def run_ours():
        calls.append("ours")
        return next(ours)

    def run_peer():
        calls.append("peer")
        return next(peers)

    r = compare_rounds(run_ours, run_peer, rounds=3)
    assert calls == ["ours", "peer"] * 3
    assert r["ours_samples_per_s"] == [300.0, 500.0, 400.0] and r["peer_samples_per_s"] == [100.0, 400.0, 200.0]
    assert r["ratio"] == pytest.approx(400.0 / 200.0) and r["ratio_best"] == pytest.approx(500.0 / 400.0)


def test_compare_peer_flag_wiring(tmp_path, capsys, monkeypatch):
    """--compare-peer: our runs and the (fake) peer's alternate; the ratio line and JSON keys."""
    from trainer.cli import build_parser
    from trainer.commands import bench

    order = []
    fake = {"samples_per_s": 900.0, "steps": 2, "warmup": 0, "world_size": 1, "global_batch": 8, "elapsed_s": 1.0,
            "step_ms": 1.0, "data_wait_ms": 0.0, "breakdown_step_ms": 1.0, "breakdown_ms": {"data": 0.5},
            "peak_rss_mb": [{"main": 1.0, "workers": 0.0}]}
    monkeypatch.setattr(bench, "run_once", lambda args: order.append("ours") or dict(fake))
    args = build_parser().parse_args(["bench", "--config", str(tiny_config(tmp_path)), "--compare-peer",
                                      "--rounds", "2", "--rows", "256"])
    assert bench.run(args, peer=lambda: order.append("peer") or "peer dlrm_main samples/s 600") == 0
    out = capsys.readouterr().out
    assert order == ["ours", "peer", "ours", "peer"]
    assert "ratio ours/peer" in out and "1.500" in out
    r = _json_line(out)
    assert r["ratio"] == pytest.approx(1.5) and r["peer_samples_per_s"] == [600.0, 600.0]


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["parquet", "device"])
def test_bench_dcnv2_on_one_gpu(tmp_path, capsys, source):
    """configs/bench_dcnv2_h100.toml on one GPU (a few steps): the production pipeline and the
    breakdown both ran on the device, fed by the Parquet reader or by batches made on the GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trainer.cli import main

    sets = ["--set", f"data.train_path={tmp_path / 'data'}", "--set", f"train.run_dir={tmp_path / 'run'}"]
    assert main(["bench", "--config", str(ROOT / "configs" / "bench_dcnv2_h100.toml"), "--steps", "5",
                 "--warmup", "3", "--rows", str(1 << 17), "--synthetic", source, *sets]) == 0
    r = _json_line(capsys.readouterr().out)
    assert r["device"].startswith("cuda") and r["precision"] == {"dense": "bf16", "embeddings": "fp16"}
    assert r["source"] == source and 0 < r["embedding_share"] < 1
    assert r["samples_per_s"] == pytest.approx(r["steps"] * r["global_batch"] / r["elapsed_s"])
    parts = r["breakdown_ms"]
    assert all(v >= 0 for v in parts.values()) and parts["emb_fwd"] > 0
    assert sum(parts.values()) <= r["breakdown_step_ms"] * (1 + 1e-6) + 5e-3  # parts are rounded to 3 decimals
