"""`[precision]` on one GPU: bf16 autocast through TrainPipelineSparseDist with fp16 tables and an
fp16 all-to-all, and fp16 dense (GradScaler, plain loop). Skipped without CUDA; run on a GPU
box with `pytest -m gpu` (see docs/gpu.md)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SYNTH_CONFIG, run_rectrain, sets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _run(synth_data, run_dir, **extra) -> dict:
    args = sets(data__train_path=str(synth_data["train"]), data__eval_path=str(synth_data["eval"]),
                train__run_dir=str(run_dir), train__device="cuda", train__max_steps=60, logging__progress_bar=False,
                checkpoint__every_steps=0, **extra)
    proc = run_rectrain(["train", "--config", str(SYNTH_CONFIG), *args], nproc=1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mixed_precision_modes_on_one_gpu_end_within_0_005_auc_of_fp32(synth_data, tmp_path):
    fp32 = _run(synth_data, tmp_path / "fp32")
    mixed = _run(synth_data, tmp_path / "mixed", precision__dense="bf16", precision__embeddings="fp16",
                 precision__comms="fp16")
    fp16 = _run(synth_data, tmp_path / "fp16", precision__dense="fp16")
    assert fp32["auc"] >= 0.75
    assert mixed["precision"]["all_to_all"] == {"forward": "float16", "backward": "float16"}
    assert mixed["precision"]["table_bytes"]["total"] / fp32["precision"]["table_bytes"]["total"] < 0.501
    assert fp16["precision"]["loss_scale"] > 0
    for run in (mixed, fp16):
        assert abs(run["auc"] - fp32["auc"]) < 0.005, (run["auc"], fp32["auc"])
