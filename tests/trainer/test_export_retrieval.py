"""`rectrain export retrieval` and `rectrain retrieve`: the exported query tower reproduces the
model, the export of a 2-rank checkpoint holds the model's full tables and candidate vectors, the
ANN index keeps >= 95% of exact Recall@10, and retrieve returns what the exact index ranks first
without the user's seen items."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import MOVIELENS, ROOT, run_rectrain
from trainer.cli import main as rectrain

TT_CONFIG = ROOT / "configs" / "two_tower_synth.toml"
ML_CONFIG = ROOT / "configs" / "two_tower_movielens.toml"


def _overrides(data: Path, run: Path, **extra) -> list[str]:
    values = {"data.train_path": str(data / "train"), "data.eval_path": str(data / "eval"),
              "data.items_path": str(data / "items"), "train.run_dir": str(run), "logging.tensorboard": False,
              "logging.progress_bar": False, **extra}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _random_model(cfg):
    """The unsharded model, materialised on CPU with random weights (no checkpoint)."""
    from trainer.build import build_unsharded_model

    model, schema = build_unsharded_model(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), schema


# --------------------------------------------------------------------------- query tower, in process


def test_query_tower_reproduces_encode_query_with_dense_and_hash_policy(tmp_path):
    """The TorchScript tower on raw rows (mapped by RawQueryInputs) == model.encode_query on the
    training reader's batch of the same rows: same ids, offsets and dense transform, same
    vectors. Dense input (log1p, a missing value with its indicator) and the hash id policy
    exercise everything the reader does to a query."""
    from data.parquet import table_to_batch
    from trainer.config import load_config
    from trainer.export.query_encoder import (RawQueryInputs, build_query_tower, query_features, random_inputs,
                                              script_query_tower)

    data = tmp_path / "data"
    cfg = load_config(TT_CONFIG, _overrides(data, tmp_path / "run", **{
        "data.dense_columns": ["age"], "data.dense_transform": "log1p", "data.dense_missing": "indicator",
        "data.id_policy": "hash"}))
    model, schema = _random_model(cfg)
    assert model.uses_dense
    rows = [{"user_id": 3, "history": [1, 2, 999_999], "age": 31.0},
            {"user_id": -7, "history": [], "age": None},
            {"user_id": 12_345, "history": [5], "age": -2.5},
            {"user_id": 4, "history": None, "age": 0.0}]
    table = pa.table({"user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
                      "history": pa.array([r["history"] for r in rows], pa.list_(pa.int64())),
                      "age": pa.array([r["age"] for r in rows], pa.float64())})
    query_only = [f for f in schema.feature_names if f not in model.query_features]
    users = replace(schema, label_columns=(), binary_labels=(), absent_features=frozenset(query_only))
    batch = table_to_batch(table, users, "rows")

    features = query_features(model)
    raw = RawQueryInputs(tuple(features), tuple(schema.dense_columns), schema.id_policy, schema.dense_transform,
                         schema.dense_missing, schema.max_list_length)
    ids, offsets, dense = raw.encode(rows)
    per_feature = batch.sparse.to_dict()
    for f in features:  # the reader's mapping, bit for bit
        assert torch.equal(ids[f.name], per_feature[f.name].values())
        assert torch.equal(offsets[f.name], per_feature[f.name].offsets()[:-1].to(torch.int64))
    assert torch.allclose(dense, batch.dense)

    module = script_query_tower(build_query_tower(model), random_inputs(features, 4, schema.num_dense))
    module.save(str(tmp_path / "tower.pt"))
    loaded = torch.jit.load(str(tmp_path / "tower.pt"))
    with torch.no_grad():
        ours = loaded(ids, offsets, dense)
        ref = model.encode_query(model.sparse(batch.sparse).to_dict(), batch.dense)
    assert ours.shape == (4, cfg.model.arch.tower_layers[-1])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    # the item table is shared by history and item_id: the tower holds the history's copy only
    assert [f.table for f in features] == ["t_user", "t_item"]


def test_query_tower_loads_without_torchrec(tmp_path):
    from trainer.config import load_config
    from trainer.export.query_encoder import build_query_tower, query_features, random_inputs, script_query_tower

    cfg = load_config(TT_CONFIG, _overrides(tmp_path, tmp_path / "run"))
    model, schema = _random_model(cfg)
    inputs = random_inputs(query_features(model), 5, schema.num_dense)
    script_query_tower(build_query_tower(model), inputs).save(str(tmp_path / "tower.pt"))
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            "ids = {'user_id': torch.tensor([1, 2]), 'history': torch.tensor([3])}; "
            "off = {'user_id': torch.tensor([0, 1]), 'history': torch.tensor([0, 1])}; "
            "print(tuple(m(ids, off, torch.zeros(2, 0)).shape), 'torchrec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tower.pt")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["(2,", "32)", "False"]


# --------------------------------------------------------------------------- export of a trained checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic two-tower data, one epoch on 2 CPU ranks (a sharded checkpoint: the user table
    on one rank, the category table replicated), exported with an IVF-Flat index."""
    from data.synth import write_two_tower

    root = tmp_path_factory.mktemp("two_tower_export")
    data, run = root / "data", root / "run"
    write_two_tower(data, 8000, seed=0)
    overrides = _overrides(data, run, **{"train.epochs": 2, "eval.at_end": True, "logging.tensorboard": True,
                                         "train.log_every": 4, "eval.every_steps": 13})  # 13 steps per epoch
    proc = run_rectrain(["train", "--config", str(TT_CONFIG), *_set_args(overrides)], nproc=2)
    final = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    out = root / "export"
    assert rectrain(["export", "retrieval", "--config", str(TT_CONFIG), *_set_args(overrides),
                     "--checkpoint", str(run / "checkpoints"), "--out", str(out), "--index", "ivf_flat",
                     "--sweep"]) == 0
    return {"data": data, "run": run, "out": out, "overrides": overrides, "train": final}


def test_two_rank_training_beats_popularity_and_logs_what_retrieval_needs(trained):
    result, run = trained["train"], trained["run"]
    meta = json.loads((trained["data"] / "meta.json").read_text())
    assert result["recall@10"] >= 2 * result["popularity_recall@10"] > 0, result
    assert result["num_users"] == meta["counts"]["eval_users"] and result["num_items"] == 1000
    assert result["targets_not_in_catalog"] == 0
    for k in (10, 50, 100):  # recall grows with K; every metric is a share
        assert 0 <= result[f"ndcg@{k}"] <= 1 and 0 < result[f"coverage@{k}"] <= 1
    assert result["recall@10"] <= result["recall@50"] <= result["recall@100"]
    assert result["hit_rate@10"] >= result["recall@10"] and 0 < result["mrr"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["prefix"] == "train"]
    assert train and all(0 <= r["inbatch_accuracy"] <= 1 and r["temperature"] > 0 for r in train)
    assert train[-1]["inbatch_accuracy"] > train[0]["inbatch_accuracy"]
    evals = [r for r in rows if r["prefix"] == "eval"]
    assert [r["step"] for r in evals] == [13, 26] and evals[-1]["recall@10"] == result["recall@10"]
    # the counts behind popularity are exact: after one epoch and after two they rank items alike
    assert evals[0]["popularity_recall@10"] == evals[1]["popularity_recall@10"]
    # TensorBoard: the scalars above, and the item vectors in the projector, labelled with titles
    projector = list((run / "tb").rglob("projector_config.pbtxt"))
    assert projector, "no embedding projector in the TensorBoard log"
    labels = list((run / "tb").rglob("metadata.tsv"))
    assert labels and labels[0].read_text().splitlines()[0].startswith("item ")


def test_one_rank_eval_of_the_two_rank_checkpoint_gives_the_same_metrics(trained, tmp_path):
    out = tmp_path / "eval.json"
    assert rectrain(["eval", "--config", str(TT_CONFIG), *_set_args(trained["overrides"]), "--checkpoint",
                     str(trained["run"] / "checkpoints"), "--out", str(out)]) == 0
    one = json.loads(out.read_text())
    for key in ("recall@10", "ndcg@10", "mrr", "coverage@10", "popularity_recall@10", "num_users"):
        assert one[key] == pytest.approx(trained["train"][key], abs=1e-6), key


def test_export_files_and_metadata(trained):
    out = trained["out"]
    meta = json.loads((out / "metadata.json").read_text())
    for name in ("items.parquet", "query_tower.pt", "index_flat.faiss", "index_ivf_flat.faiss", "users.parquet"):
        assert (out / name).is_file() and meta["files"][name] == (out / name).stat().st_size
    assert meta["total_bytes"] == sum(meta["files"].values())
    assert (meta["model"], meta["dim"], meta["num_items"], meta["item_id_feature"]) == ("two_tower", 32, 1000, "item_id")
    assert meta["history_features"] == ["history"]
    assert meta["query_inputs"]["id_policy"] == "modulo"
    assert [f["name"] for f in meta["query_inputs"]["features"]] == ["user_id", "history"]
    assert meta["index"]["ann"]["kind"] == "ivf_flat" and meta["index"]["ann"]["nprobe"] >= 1
    assert meta["query_tower_max_abs_error"] <= 1e-5
    assert meta["step"] == trained["train"]["step"]

    items = pq.read_table(out / "items.parquet")
    assert items.schema.field("vector").type == pa.list_(pa.float32(), 32)
    assert items.column("item_id").to_pylist() == list(range(1000))
    assert items.column("title").to_pylist()[0].startswith("item 0 ")
    eval_users = pq.read_table(trained["data"] / "eval")
    users = pq.read_table(out / "users.parquet")
    assert users.num_rows == eval_users.num_rows == meta["num_users"]
    assert {"user_id", "history", "targets", "seen"} <= set(users.column_names)

    recall = meta["recall"]
    assert recall["ks"] == [10, 50, 100] and recall["users"] == users.num_rows
    exact, ann = recall["exact"]["recall@10"], recall["ann"]["recall@10"]
    # closed loop: the exported files give the trained model's own eval recall (ties aside) ...
    assert abs(exact - trained["train"]["recall@10"]) < 0.01
    assert exact > 2 * trained["train"]["popularity_recall@10"]
    # ... and the IVF index keeps it
    assert ann >= 0.95 * exact
    sweep = recall["sweep"]
    assert [s["nprobe"] for s in sweep] == sorted(s["nprobe"] for s in sweep) and len(sweep) >= 3
    assert sweep[-1]["recall@10"] == pytest.approx(exact, abs=1e-9)  # nprobe = nlist: exhaustive


def test_export_holds_the_checkpoints_full_tables_and_candidate_vectors(trained):
    """The 2-rank DCP checkpoint, resharded into plain CPU tensors, equals DCP's own full
    conversion; items.parquet holds the candidate tower's output for every item, computed here
    through the model's forward on training rows."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from data.parquet import ParquetStream
    from trainer.checkpoint import resolve_checkpoint
    from trainer.config import load_config
    from trainer.export.checkpoint_model import load_cpu_model
    from trainer.export.items import ItemTable

    cfg = load_config(TT_CONFIG, trained["overrides"])
    ckpt = resolve_checkpoint(trained["run"] / "checkpoints")
    model, schema = load_cpu_model(cfg, ckpt)
    full_path = trained["out"].parent / "full.pt"
    dcp_to_torch_save(ckpt, full_path)
    full = torch.load(full_path, weights_only=False)["model"]
    state = model.state_dict()
    assert "sparse.embedding_bags.t_user.weight" in state
    for key, value in state.items():
        assert type(value) is torch.Tensor, key
        assert torch.equal(value, full[f"model.{key}"]), key

    items = ItemTable.read(trained["out"] / "items.parquet")
    train_schema = replace(schema, label_columns=(), binary_labels=())
    batch = next(iter(ParquetStream(str(trained["data"] / "train"), train_schema, batch_size=512)))
    with torch.no_grad():
        out = model(batch.dense, batch.sparse)
    rows = items.rows_of(out["item_ids"].numpy())
    assert (rows >= 0).all()
    np.testing.assert_allclose(items.vectors[rows], out["candidate"].numpy(), atol=1e-5, rtol=0)


def _retrieve(capsys, *args) -> tuple[int, str, str]:
    code = rectrain(["retrieve", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_retrieve_round_trip(trained, capsys):
    import faiss

    from trainer.export.serving import RetrievalExport

    out = trained["out"]
    export = RetrievalExport(out)
    user = export.users.rows()[5]
    seen = set(user["seen"])
    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--user", str(user["user_id"]), "--k", "10", "--json")
    got = json.loads(stdout)
    assert code == 0 and len(got["items"]) == 10 and got["excluded"] == len(seen)
    assert not seen & set(got["items"])
    assert got["latency_ms"] > 0 and got["titles"][0].startswith(f"item {got['items'][0]} ")

    # the exact index, searched directly, ranks the same item first once seen items are dropped
    q = export.encode([user])
    scores, labels = faiss.read_index(str(out / "index_flat.faiss")).search(q, 1000)
    ranked = [int(export.items.item_ids[r]) for r in labels[0] if int(export.items.item_ids[r]) not in seen]
    assert got["items"] == ranked[:10]
    assert got["scores"][0] == pytest.approx(float(scores[0][[int(export.items.item_ids[r]) for r in labels[0]]
                                                             .index(ranked[0])]), abs=1e-6)

    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--user", str(user["user_id"]), "--include-seen",
                                "--json")
    assert json.loads(stdout)["items"] == [int(export.items.item_ids[r]) for r in labels[0][:10]]

    # raw --features: same user, same answer (history items excluded unless "seen" is given)
    features = json.dumps({"user_id": user["user_id"], "history": user["history"], "seen": user["seen"]})
    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--features", features, "--json")
    assert json.loads(stdout)["items"] == got["items"]
    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--features",
                                json.dumps({"user_id": 1, "history": [1, 2, 3]}), "--index", "ann", "--json")
    assert not {1, 2, 3} & set(json.loads(stdout)["items"])

    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--user", str(user["user_id"]), "--k", "3")
    assert code == 0 and "latency:" in stdout and stdout.count(" score ") == 3


@pytest.mark.parametrize("args, message", [
    (["--user", "123456"], "user 123456 is not in"),
    (["--features", '{"user_id": 3,'], "--features is not valid JSON"),
    (["--features", '{"usr": 3}'], "unknown feature(s) ['usr']"),
    (["--features", '{"history": ["a"]}'], "ids must be integers"),
    (["--features", '{"user_id": 3, "seen": [1.5]}'], "'seen' must be a list of integer item ids"),
])
def test_retrieve_errors_are_one_line(trained, capsys, args, message):
    code, _, err = _retrieve(capsys, "--export", str(trained["out"]), *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_retrieve_without_an_export(tmp_path, capsys):
    code, _, err = _retrieve(capsys, "--export", str(tmp_path), "--user", "1")
    assert code == 2 and "metadata.json: no such file" in err


def test_export_refuses_another_config(trained, tmp_path, capsys):
    overrides = trained["overrides"] + ["model.embedding_dim=16"]
    code = rectrain(["export", "retrieval", "--config", str(TT_CONFIG), *_set_args(overrides), "--checkpoint",
                     str(trained["run"] / "checkpoints"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "was trained with another config" in err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- index building


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_ann_indexes_find_the_exact_neighbours_of_clustered_vectors(kind):
    from trainer.export import faiss_index as fi

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + 0.05 * rng.normal(size=(200, 32))
    params = fi.IndexParams(kind=kind).resolve(len(x), 32)
    exclude = [np.array([i]) for i in range(200)]  # each query's own item
    exact, _ = fi.search_excluding(fi.build_flat(x), q, 10, exclude)
    approx, _ = fi.search_excluding(fi.build_index(x, params), q, 10, exclude)
    assert not any(i in row for i, row in enumerate(exact))
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    # PQ compresses the vectors (32 bytes instead of 128 here): close neighbours inside a tight
    # cluster swap places, so it keeps less of the exact top 10 than the lossless indexes
    assert overlap >= (0.75 if kind == "ivf_pq" else 0.9), (kind, params.describe(), overlap)


# --------------------------------------------------------------------------- MovieLens


def test_movielens_export_retrieve_round_trip(tmp_path, capsys):
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data not found at {MOVIELENS}")
    data, run, out = tmp_path / "ml", tmp_path / "run", tmp_path / "export"
    assert rectrain(["data", "movielens", "--task", "retrieval", "--src", str(MOVIELENS), "--out", str(data)]) == 0
    overrides = _overrides(data, run, **{"train.max_steps": 40, "eval.at_end": False})
    assert rectrain(["train", "--config", str(ML_CONFIG), *_set_args(overrides)]) == 0
    assert rectrain(["export", "retrieval", "--config", str(ML_CONFIG), *_set_args(overrides), "--checkpoint",
                     str(run / "checkpoints"), "--out", str(out), "--index", "hnsw"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_items"] == 9742 and meta["index"]["ann"]["kind"] == "hnsw"
    assert meta["recall"]["ann"]["recall@10"] >= 0.9 * meta["recall"]["exact"]["recall@10"]
    user = pq.read_table(out / "users.parquet").slice(0, 1).to_pylist()[0]
    code, stdout, _ = _retrieve(capsys, "--export", str(out), "--user", str(user["user_id"]), "--json")
    got = json.loads(stdout)
    assert code == 0 and len(got["items"]) == 10 and not set(user["seen"]) & set(got["items"])
    assert all(isinstance(t, str) and t for t in got["titles"])
