"""Every ranking model trains for real on 2 CPU ranks (torchrun, gloo, DMP with FBGEMM
kernels): binary models reach test AUC >= 0.70 on the synthetic Criteo-shaped log, multi-task
models learn every task on the multi-task log and on MovieLens, and a multi-task checkpoint
written by 2 ranks evaluates identically on 1."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, read_jsonl, run_rectrain, sets

pytestmark = pytest.mark.multiprocess


def _train(config: str, data: dict, run_dir, nproc: int = 2, **extra) -> dict:
    args = sets(data__train_path=str(data["train"]), data__eval_path=str(data["eval"]), train__run_dir=str(run_dir),
                logging__progress_bar=False, checkpoint__every_steps=0, **extra)
    proc = run_rectrain(["train", "--config", str(ROOT / "configs" / config), *args], nproc=nproc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", ["dcn_v2_synth.toml", "dlrm_dcnv2_synth.toml", "deepfm_synth.toml",
                                   "wide_deep_synth.toml"])
def test_binary_model_reaches_auc_on_two_ranks(config, synth_data, tmp_path):
    result = _train(config, synth_data, tmp_path)
    assert result["auc"] >= 0.70, result
    assert result["num_samples"] == 8_000  # every eval row exactly once
    assert result["samples_trained"] == 60_000  # every train row exactly once


def _assert_learned_every_task(result: dict, min_auc: float) -> None:
    for name, metrics in result["tasks"].items():
        if "auc" in metrics:
            assert metrics["auc"] >= min_auc, (name, metrics)
            assert metrics["ne"] < 1.0, (name, metrics)  # beats predicting the base rate
        else:
            assert metrics["mse"] < metrics["label_variance"], (name, metrics)  # beats the mean


# shared_bottom is the simplest of the three (one process: test_zoo_one_process.py); MMoE and PLE
# train on two ranks here.
@pytest.mark.parametrize("config", ["ple_synth.toml"])
def test_multitask_model_learns_every_task(config, multitask_data, tmp_path):
    result = _train(config, multitask_data, tmp_path)
    _assert_learned_every_task(result, 0.70)
    assert result["serving"] and all(v >= 0.70 for v in result["serving"].values())


def test_mmoe_learns_every_task_and_its_checkpoint_evaluates_identically_on_one_rank(multitask_data, tmp_path):
    result = _train("mmoe_synth.toml", multitask_data, tmp_path)
    _assert_learned_every_task(result, 0.70)
    assert all(m["num_samples"] == 8_000 for m in result["tasks"].values())  # every task, all ranks
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["prefix"] == "train"]
    assert all(f"loss/{t}" in train[-1] for t in result["tasks"])  # per-task loss in the logs and TensorBoard
    final = [r for r in rows if r["prefix"] == "eval"][-1]
    assert final["click/auc"] == result["tasks"]["click"]["auc"] and "serving/auc_click" in final
    out = tmp_path / "eval_one_rank.json"
    run_rectrain(["eval", "--config", str(ROOT / "configs" / "mmoe_synth.toml"),
                  *sets(data__eval_path=str(multitask_data["eval"]), train__run_dir=str(tmp_path)),
                  "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out)], nproc=1)
    one = json.loads(out.read_text())
    assert one["world_size"] == 1
    assert one["tasks"].keys() == result["tasks"].keys()
    for name, metrics in result["tasks"].items():
        for key, value in metrics.items():
            assert one["tasks"][name][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key)
    for key, value in result["serving"].items():
        assert one["serving"][key] == pytest.approx(value, abs=1e-6)


def test_mmoe_on_movielens_beats_the_constant_baseline_on_every_task(movielens_data, tmp_path):
    result = _train("mmoe_movielens.toml", movielens_data, tmp_path)
    _assert_learned_every_task(result, 0.60)
