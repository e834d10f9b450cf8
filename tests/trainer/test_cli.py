"""The CLI contract: plan dry runs, data commands and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


from tests.conftest import ROOT, SYNTH_CONFIG, _env, run_rectrain


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)


def test_plan_for_criteo_on_eight_gpus_row_wise_shards_the_big_tables():
    proc = run_rectrain(["plan", "--config", "configs/dlrm_criteo.toml", "--world-size", "8", "--device", "cuda",
                         "--json"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tables = {r["table"]: r for r in result["tables"]}
    assert len(tables) == 26
    assert tables["t_cat_0"]["sharding_type"] == "row_wise"
    assert len(tables["t_cat_0"]["shards"]) == 8
    assert sum(s[0] for s in tables["t_cat_0"]["shards"]) == 45_833_188
    assert all(s[1] == 128 for s in tables["t_cat_0"]["shards"])
    memory = result["memory_per_rank"]
    assert sorted(int(k) for k in memory) == list(range(8))
    # 26 tables x 128 floats: ~134 GiB of weights in total, split over the 8 GPUs.
    total_hbm = sum(m["hbm"] for m in memory.values())
    weights = sum(n for r in result["tables"] for n in [sum(s[0] * s[1] for s in r["shards"])]) * 4
    assert total_hbm >= weights


def test_plan_text_on_cpu_lists_each_table_and_rank_memory():
    proc = run_rectrain(["plan", "--config", str(SYNTH_CONFIG), "--world-size", "2", "--device", "cpu"])
    out = proc.stdout
    assert out.count("t_cat_") == 26
    assert "column_wise" in out and "data_parallel" in out and "table_wise" in out
    assert "rank" in out and "ddr (GiB)" in out


def test_row_wise_on_cpu_is_a_one_line_error_naming_the_key():
    proc = _cli("plan", "--config", str(SYNTH_CONFIG), "--world-size", "2", "--device", "cpu",
                "--set", 'sharding.tables.t_cat_0={type = "row_wise"}')
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "sharding.tables.t_cat_0.type" in err[0] and "GPU" in err[0]


def test_bad_override_is_a_one_line_error():
    proc = _cli("train", "--config", str(SYNTH_CONFIG), "--set", "train.epochs=0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "train.epochs" in proc.stderr


def test_missing_data_is_a_one_line_error_naming_the_path(tmp_path):
    proc = _cli("train", "--config", str(SYNTH_CONFIG), "--set", f'data.train_path="{tmp_path}/nope"',
                "--set", f'train.run_dir="{tmp_path}/run"')
    assert proc.returncode == 2
    assert f"{tmp_path}/nope" in proc.stderr and "rectrain data synth" in proc.stderr


def test_synth_then_inspect(tmp_path):
    out = tmp_path / "d"
    proc = _cli("data", "synth", "--out", str(out), "--rows", "3000", "--files", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.parquet"))) == 2
    proc = _cli("data", "inspect", str(out), "--json")
    report = json.loads(proc.stdout)
    assert report["rows"] == 3000 and report["files"] == 2
    assert report["columns"]["label"]["min"] == 0 and report["columns"]["label"]["max"] == 1
    assert report["columns"]["cat_23"]["max_list_length"] <= 5


def test_fused_adam_on_cpu_is_a_one_line_error():
    proc = _cli("plan", "--config", str(SYNTH_CONFIG), "--world-size", "1", "--device", "cpu",
                "--set", "optimizer.embedding=adam")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "optimizer.embedding" in proc.stderr and "sgd" in proc.stderr


def _criteo_line(label, ints, cats) -> str:
    return "\t".join([str(label), *("" if v is None else str(v) for v in ints), *(c or "" for c in cats)])


def test_data_criteo_converts_counts_bad_lines_and_feeds_dlrm_criteo_small(tmp_path):
    import pyarrow.parquet as pq

    good = [_criteo_line(i % 2, [i, None, -1] + [3] * 10, ["68fd1e64", ""] + ["0000000a"] * 24) for i in range(40)]
    lines = good[:10] + ["1\t2\t3"] + good[10:] + [_criteo_line(0, ["x"] + [1] * 12, ["00000001"] * 26)]
    (tmp_path / "day_0").write_text("\n".join(lines) + "\n")
    proc = _cli("data", "criteo", "--src", str(tmp_path / "day_0"), "--out", str(tmp_path / "pq"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"] == 40 and report["malformed"] == 2
    assert [b["line"] for b in report["files"][0]["bad_lines"]] == [11, 42]
    table = pq.read_table(tmp_path / "pq")
    assert table.num_rows == 40
    assert table.column("cat_0").to_pylist()[0] == 0x68FD1E64 and table.column("cat_1").null_count == 40
    # the converter's output is what the Criteo configs read: their columns exist with the right types
    proc = _cli("data", "inspect", str(tmp_path / "pq"), "--json")
    columns = json.loads(proc.stdout)["columns"]
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "dlrm_criteo_small.toml")
    for c in cfg.data.label_columns + cfg.data.dense_columns + cfg.data.sparse_columns:
        assert c in columns, c


def test_data_synth_rejects_zero_rows_in_one_line(tmp_path):
    proc = _cli("data", "synth", "--out", str(tmp_path / "x"), "--rows", "0")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--rows" in proc.stderr


def test_plan_derived_tables_follow_the_sharding_of_their_base_table():
    proc = run_rectrain(["plan", "--config", "configs/deepfm_synth.toml", "--world-size", "2", "--device", "cpu",
                         "--json"])
    tables = {r["table"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["tables"]}
    for base in ("t_cat_1", "t_cat_2", "t_cat_8"):
        assert tables[f"fm1_{base}"]["sharding_type"] == tables[base]["sharding_type"], base
    assert {tables[f"fm1_t_cat_{i}"]["sharding_type"] for i in range(26)} <= {"table_wise", "column_wise",
                                                                               "data_parallel"}
    assert tables["fm1_t_cat_2"]["sharding_type"] == "column_wise"  # [sharding.tables] t_cat_2
