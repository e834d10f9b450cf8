"""Every registered model trains through the CLI in one process with its shipped synthetic
config: a few steps, a checkpoint, per-task losses in the logs and per-task metrics at the end."""

from __future__ import annotations

import json
import tomllib

import pytest

from data.synth import write_synthetic, write_two_tower
from models import MODELS
from tests.conftest import ROOT, read_jsonl
from trainer.cli import main


@pytest.fixture(scope="module")
def small_logs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zoo_one_process")
    out = {}
    for schema in ("criteo", "multitask"):
        write_synthetic(root / schema / "train", 1500, seed=0, schema=schema)
        write_synthetic(root / schema / "eval", 500, seed=1, schema=schema)
        out[schema] = root / schema
    write_two_tower(root / "two_tower", 3000, seed=0)  # train, eval and items
    out["two_tower"] = root / "two_tower"
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_trains_in_one_process_from_its_synthetic_config(name, small_logs, tmp_path):
    config = ROOT / "configs" / f"{name}_synth.toml"
    assert config.is_file(), f"model {name!r} has no configs/{name}_synth.toml"
    labels = tomllib.loads(config.read_text())["data"]["label_columns"]
    retrieval = not labels  # every row's item is its positive
    data = small_logs["two_tower" if retrieval else "multitask" if "click" in labels else "criteo"]
    run = tmp_path / "run"
    items = ["--set", f'data.items_path="{data / "items"}"'] if retrieval else []
    args = ["train", "--config", str(config), *items, "--set", f'data.train_path="{data / "train"}"',
            "--set", f'data.eval_path="{data / "eval"}"', "--set", f'train.run_dir="{run}"',
            "--set", "train.max_steps=4", "--set", "train.log_every=2", "--set", "data.batch_size=128", "--set", "logging.tensorboard=false",
            "--set", "logging.progress_bar=false", "--set", 'train.device="cpu"']
    assert main(args) == 0
    tasks = json.loads((run / "eval_final.json").read_text())
    train_rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4]
    if retrieval:
        assert 0.0 <= tasks["recall@10"] <= 1.0 and tasks["num_users"] > 0 and "popularity_recall@10" in tasks
        assert all(0.0 <= r["inbatch_accuracy"] <= 1.0 for r in train_rows)
    elif len(labels) > 1:
        names = set(tasks["tasks"])
        assert names == set(labels)
        assert all(f"loss/{t}" in train_rows[-1] for t in names)  # per-task training loss is logged
        assert tasks["serving"]
    else:
        assert 0.0 <= tasks["auc"] <= 1.0 and tasks["num_samples"] == 500
    assert (run / "checkpoints" / "step_00000004" / ".metadata").is_file()
