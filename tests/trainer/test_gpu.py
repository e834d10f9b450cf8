"""GPU path: one GPU, TrainPipelineSparseDist, a row-wise table. Skipped without CUDA; run on a
GPU box with `pytest -m gpu` (see docs/gpu.md)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SYNTH_CONFIG, run_rectrain, sets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_one_gpu_pipeline_with_row_wise_table_reaches_auc(synth_data, tmp_path):
    args = sets(
        data__train_path=str(synth_data["train"]), data__eval_path=str(synth_data["eval"]),
        train__run_dir=str(tmp_path), train__device="cuda", logging__progress_bar=False,
        checkpoint__every_steps=25, eval__every_steps=40,
    ) + ["--set", 'sharding.tables.t_cat_2={type = "row_wise"}', "--set", 'sharding.tables.t_cat_9={type = "row_wise"}']
    proc = run_rectrain(["train", "--config", str(SYNTH_CONFIG), *args], nproc=1)
    final = json.loads((tmp_path / "eval_final.json").read_text())
    assert final["auc"] >= 0.70
    assert final["num_samples"] == 8_000
    assert json.loads(proc.stdout.strip().splitlines()[-1])["samples_trained"] == 60_000
    assert "row_wise" in proc.stdout


def test_gpu_checkpoint_evaluates_on_cpu_identically(synth_data, tmp_path):
    base = sets(data__train_path=str(synth_data["train"]), data__eval_path=str(synth_data["eval"]),
                train__run_dir=str(tmp_path), logging__progress_bar=False, train__max_steps=20)
    run_rectrain(["train", "--config", str(SYNTH_CONFIG), *base, *sets(train__device="cuda")], nproc=1)
    gpu = json.loads((tmp_path / "eval_final.json").read_text())
    out = tmp_path / "cpu_eval.json"
    run_rectrain(["eval", "--config", str(SYNTH_CONFIG), *base, *sets(train__device="cpu"),
                  "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out)], nproc=1)
    cpu = json.loads(out.read_text())
    assert cpu["auc"] == pytest.approx(gpu["auc"], abs=1e-4)
    assert cpu["logloss"] == pytest.approx(gpu["logloss"], rel=1e-4)


def test_two_tower_on_one_gpu_with_a_row_wise_item_table_beats_popularity(tmp_path):
    from data.synth import write_two_tower

    data = tmp_path / "data"
    write_two_tower(data, 20_000, seed=0)
    config = SYNTH_CONFIG.parent / "two_tower_synth.toml"
    args = sets(data__train_path=str(data / "train"), data__eval_path=str(data / "eval"),
                data__items_path=str(data / "items"), train__run_dir=str(tmp_path / "run"), train__device="cuda",
                logging__progress_bar=False, model__arch__extra_negatives=64) + \
        ["--set", 'sharding.tables.t_item={type = "row_wise"}']
    proc = run_rectrain(["train", "--config", str(config), *args], nproc=1)
    final = json.loads((tmp_path / "run" / "eval_final.json").read_text())
    assert final["recall@10"] >= 2 * final["popularity_recall@10"], final
    assert "row_wise" in proc.stdout
