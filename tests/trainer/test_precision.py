"""`[precision]`: bf16/fp16 dense, fp16 tables, fp16/bf16 quantized all-to-all (README, Precision).

Same seed and data for every run, so the AUC deltas measure the precision alone: at 25-40 steps of
DLRM on the synthetic log they are ~1e-4 (bf16 dense, fp16 tables), far inside the 0.005 bound.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from models.precision import dense_input, embedding_grad_unscale
from tests.conftest import ROOT, SYNTH_CONFIG, _env, sets
from trainer.cli import main
from trainer.config import ConfigError, load_config
from trainer.config_diff import resume_conflicts

STEPS = 30


def _train(synth_data, run_dir, **extra) -> dict:
    """One in-process training run on the synthetic log; its train result."""
    settings = dict(data__train_path=str(synth_data["train"]), data__eval_path=str(synth_data["eval"]),
                    train__run_dir=str(run_dir), train__device="cpu", train__max_steps=STEPS,
                    logging__progress_bar=False, logging__tensorboard=False, checkpoint__every_steps=0,
                    checkpoint__at_end=False)
    args = ["train", "--config", str(SYNTH_CONFIG), *sets(**{**settings, **extra})]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision")
    return {
        "fp32": _train(synth_data, root / "fp32"),
        "bf16": _train(synth_data, root / "bf16", precision__dense="bf16"),
        "fp16_tables": _train(synth_data, root / "fp16_tables", precision__embeddings="fp16"),
    }


def test_bf16_dense_ends_within_0_005_auc_of_fp32(runs):
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["auc"] > 0.8
    assert abs(bf16["auc"] - fp32["auc"]) < 0.005, (bf16["auc"], fp32["auc"])
    assert bf16["auc"] != fp32["auc"]  # bf16 really ran


def test_fp16_tables_halve_the_measured_table_bytes_and_end_within_0_005_auc(runs):
    fp32, fp16 = runs["fp32"]["precision"]["table_bytes"], runs["fp16_tables"]["precision"]["table_bytes"]
    assert set(fp32) == {"total", "float32"}
    # The fused (sharded) tables are stored in fp16; the three tiny data-parallel tables
    # (3 + 10 + 4 rows x 16 x 4 bytes) stay fp32.
    dp_bytes = (3 + 10 + 4) * 16 * 4
    assert fp16["float32"] == dp_bytes
    assert fp16["float16"] * 2 == fp32["total"] - dp_bytes
    assert fp16["total"] / fp32["total"] < 0.501
    assert abs(runs["fp16_tables"]["auc"] - runs["fp32"]["auc"]) < 0.005


def _tables_after(synth_data, tmp_path, name, **extra) -> tuple[dict[str, torch.Tensor], dict]:
    run = tmp_path / name
    result = _train(synth_data, run, train__max_steps=3, eval__at_end=False, checkpoint__at_end=True,
           optimizer__embedding="sgd", optimizer__embedding_lr=0.5, optimizer__warmup_steps=0, **extra)
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(next((run / "checkpoints").glob("step_*"))), str(out))
    model = torch.load(out, weights_only=False)["model"]
    return {k: v.float() for k, v in model.items() if ".embedding_bags." in k}, result


def test_fp16_dense_scales_the_loss_but_the_fused_tables_get_the_true_gradient(synth_data, tmp_path):
    # Plain SGD in the fused kernel (not scale-invariant like Adagrad): a loss-scaled gradient
    # (x65536) reaching the tables would move their rows ~65536 times too far.
    fp32, _ = _tables_after(synth_data, tmp_path, "fp32")
    fp16, result = _tables_after(synth_data, tmp_path, "fp16", precision__dense="fp16")
    assert result["precision"]["loss_scale"] >= 1024 and result["step"] == 3 and result["skipped_steps"] == 0
    assert fp32.keys() == fp16.keys() and fp32
    moved = max((fp16[k] - fp32[k]).abs().max().item() for k in fp32)
    assert moved < 1e-3, moved  # fp16 round-off only


def test_dense_input_unscales_the_gradient_into_the_tables_and_zeroes_an_overflow():
    scale = torch.tensor(1024.0)
    x = torch.ones(2, 3, requires_grad=True)
    with embedding_grad_unscale(lambda: scale) as boundary, torch.autocast("cpu", dtype=torch.float16):
        y = dense_input(x)
    assert y.dtype == torch.float16 and boundary.calls == 1
    (y.float().sum() * scale).backward()
    assert torch.equal(x.grad, torch.ones(2, 3))
    x.grad = None
    with embedding_grad_unscale(lambda: scale):
        y = dense_input(x)
    (y * torch.tensor([[1.0, float("inf"), 1.0], [1.0, 1.0, 1.0]])).sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))  # the step GradScaler skips: no update from it
    x.grad = None
    (dense_input(x) * 3).sum().backward()  # outside training under fp16: untouched
    assert torch.equal(x.grad, torch.full((2, 3), 3.0))


def test_an_overflow_into_the_tables_lowers_the_loss_scale_though_the_dense_gradients_are_finite():
    from trainer.precision import DensePrecision

    precision = DensePrecision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # no overflow of its own in fp16
    dense = torch.nn.Linear(3, 1)
    table_rows = torch.ones(2, 3, requires_grad=True)
    optimizer = _DenseOnly(torch.optim.SGD(dense.parameters(), lr=0.1))
    start = precision.scaler.get_scale()
    for overflow in (False, True):
        with precision.forward(training=True):
            pooled = dense_input(table_rows)
            # the dense gradient stays finite; only the one into the tables overflows
            loss = dense(pooled.detach().float()).sum() + (pooled.float() * (float("inf") if overflow else 1.0)).sum()
        precision.backward(loss)
        precision.step(optimizer)
        if not overflow:
            assert precision.scaler.get_scale() == start  # growth only after many clean steps
    assert precision.scaler.get_scale() == start * precision.scaler.get_backoff_factor()
    assert torch.isfinite(dense.weight).all()


def test_an_overflow_on_both_sides_backs_the_loss_scale_off_once():
    from trainer.precision import DensePrecision

    precision = DensePrecision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    dense = torch.nn.Linear(3, 1)
    table_rows = torch.ones(2, 3, requires_grad=True)
    start = precision.scaler.get_scale()
    with precision.forward(training=True):
        pooled = dense_input(table_rows)
        loss = dense(pooled.float()).sum() * float("inf")  # the dense and the table gradients overflow
    precision.backward(loss)
    precision.step(_DenseOnly(torch.optim.SGD(dense.parameters(), lr=0.1)))
    assert precision.scaler.get_scale() == start * precision.scaler.get_backoff_factor()


class _DenseOnly:
    """The CombinedOptimizer shape DensePrecision.step walks: (name, optimizer) pairs."""

    def __init__(self, opt) -> None:
        self.optimizers = [("dense", opt)]


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("precision.dense", '"fp8"', "fp32, bf16, fp16"),
    ("precision.embeddings", '"bf16"', "fp32, fp16"),
    ("precision.comms", '"int8"', "fp32, fp16, bf16"),
    ("precision.tables", '"fp16"', "valid keys here are comms, dense, embeddings"),
])
def test_bad_precision_values_are_one_line_errors(key, value, fix):
    with pytest.raises(ConfigError) as e:
        load_config(SYNTH_CONFIG, [f"{key}={value}"])
    assert key in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_a_changed_dense_or_table_dtype_but_takes_other_comms():
    saved = load_config(SYNTH_CONFIG).to_dict()
    assert resume_conflicts(saved, load_config(SYNTH_CONFIG, ['precision.comms="bf16"']).to_dict()) == {}
    for key in ("precision.dense", "precision.embeddings"):
        conflicts = resume_conflicts(saved, load_config(SYNTH_CONFIG, [f'{key}="fp16"']).to_dict())
        assert list(conflicts) == [key]


def test_a_checkpoint_config_from_before_the_precision_section_resumes_as_fp32():
    saved = load_config(SYNTH_CONFIG).to_dict()
    del saved["precision"]
    assert resume_conflicts(saved, load_config(SYNTH_CONFIG).to_dict()) == {}
    assert list(resume_conflicts(saved, load_config(SYNTH_CONFIG, ['precision.dense="bf16"']).to_dict())) == \
        ["precision.dense"]


@pytest.mark.multiprocess
def test_fp16_and_bf16_quantized_comms_train_on_two_cpu_ranks(synth_data, tmp_path):
    """One torchrun job over gloo trains the same run with fp32, fp16 and bf16 all-to-alls."""
    overrides = sets(data__train_path=str(synth_data["train"]), data__eval_path=str(synth_data["eval"]),
                     train__max_steps=20, logging__progress_bar=False, logging__tensorboard=False,
                     checkpoint__at_end=False, checkpoint__every_steps=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "trainer" / "precision_worker.py"), str(SYNTH_CONFIG), str(tmp_path),
           "fp32,fp16,bf16", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("fp32", "fp16", "bf16")}
    wire = {m: r["precision"]["all_to_all"] for m, r in results.items()}
    assert wire == {"fp32": {"forward": "float32", "backward": "float32"},
                    "fp16": {"forward": "float16", "backward": "float16"},
                    "bf16": {"forward": "bfloat16", "backward": "bfloat16"}}
    for mode in ("fp16", "bf16"):
        assert results[mode]["samples_trained"] == results["fp32"]["samples_trained"] == 20 * 2 * 512
        assert results[mode]["auc"] != results["fp32"]["auc"]  # the wire dtype changed the numbers...
        assert abs(results[mode]["auc"] - results["fp32"]["auc"]) < 0.005  # ...by little
