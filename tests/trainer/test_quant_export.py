"""Quantized evaluation, `rectrain export ranking` (with its parity gate) and `rectrain score`.

One small DLRM (tables at dim 32) is trained once per module on synthetic Criteo-shaped data in
this process; DCN-v2 and MMoE get a few training steps each (their round trip needs a
checkpoint, not a good model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT
from trainer.cli import main as rectrain

DEBUG_CONFIG = ROOT / "configs" / "dlrm_debug.toml"


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={_toml(v)}")]


def _common(data: Path, run: Path, batch: int) -> dict:
    return {"data.train_path": str(data / "train"), "data.eval_path": str(data / "eval"), "train.run_dir": str(run),
            "data.num_workers": 0, "data.batch_size": batch, "data.eval_batch_size": 1024,
            "logging.tensorboard": False, "logging.progress_bar": False, "checkpoint.every_steps": 0,
            "train.device": "cpu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{name: {"args", "checkpoint", "eval", ...}} for dlrm (trained: 16k rows), dcn_v2
    and mmoe (4 steps each)."""
    from data.synth import write_synthetic

    root = tmp_path_factory.mktemp("quant_export")
    criteo, multitask = root / "criteo", root / "multitask"
    write_synthetic(criteo / "train", 16_000, seed=0, files=1, row_group_rows=4096)
    write_synthetic(criteo / "eval", 4_000, seed=1, files=2, row_group_rows=1024)
    write_synthetic(multitask / "train", 2_000, seed=0, files=1, row_group_rows=1024, schema="multitask")
    write_synthetic(multitask / "eval", 1_500, seed=1, files=1, row_group_rows=1024, schema="multitask")
    specs = {
        "dlrm": (DEBUG_CONFIG, criteo, {**_common(criteo, root / "dlrm", 256), "model.embedding_dim": 32,
                                         "model.arch.dense_arch": [16, 32], "eval.at_end": False}),
        "dcn_v2": (DEBUG_CONFIG, criteo,  # dlrm_debug's data and tables, a low-rank DCN-v2 on them
                   {**_common(criteo, root / "dcn_v2", 256), "model.name": "dcn_v2", "train.max_steps": 4,
                    "model.arch": {"cross_layers": 2, "low_rank": 8, "deep_arch": [32]}, "eval.at_end": False}),
        "mmoe": (ROOT / "configs" / "mmoe_synth.toml", multitask,
                 {**_common(multitask, root / "mmoe", 256), "train.max_steps": 4, "eval.at_end": False}),
    }
    out = {}
    for name, (config, data, overrides) in specs.items():
        args = ["--config", str(config), *_sets(overrides)]
        assert rectrain(["train", *args]) == 0
        out[name] = {"args": args, "checkpoint": Path(overrides["train.run_dir"]) / "checkpoints",
                     "eval": data / "eval", "root": root, "config": config, "overrides": overrides}
    return out


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rectrain: error:")]
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- quantized eval


def test_quantized_eval_keeps_auc_and_shrinks_tables(runs, capsys, tmp_path):
    """int8 within 0.002 AUC of fp32 with tables <= 0.3x its bytes; int4 within 0.01 and <= 0.17x;
    fp16 halves them. Every metric is reported next to fp32's, and fp32's equals `rectrain eval`."""
    run = runs["dlrm"]
    assert rectrain(["eval", *run["args"], "--checkpoint", str(run["checkpoint"]), "--quantize", "int8,int4,fp16",
                     "--out", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    result = _last_json(out)
    assert json.loads((tmp_path / "q.json").read_text()) == result
    assert "fp32" in out.splitlines()[0] and "int4" in out.splitlines()[0]  # the side-by-side table
    fp32 = result["fp32"]
    assert fp32["num_samples"] == 4000 and fp32["auc"] > 0.6, fp32
    for mode, max_delta, max_ratio in (("int8", 0.002, 0.3), ("int4", 0.01, 0.17), ("fp16", 0.001, 0.51)):
        assert abs(result[mode]["auc"] - fp32["auc"]) <= max_delta, (mode, result[mode], fp32)
        assert result["delta"][mode]["auc"] == pytest.approx(result[mode]["auc"] - fp32["auc"])
        assert result["table_ratio"][mode] <= max_ratio, (mode, result["table_bytes"])
        assert result[mode]["num_samples"] == 4000
    # the bytes are the tensors': 4927 rows x 32 dims x 4 bytes of fp32
    assert result["table_bytes"]["fp32"] == 4927 * 32 * 4
    assert result["table_ratio"]["fp16"] == pytest.approx(0.5, abs=1e-3)
    assert rectrain(["eval", *run["args"], "--checkpoint", str(run["checkpoint"]), "--out", str(tmp_path / "e.json")]) == 0
    plain = _last_json(capsys.readouterr().out)
    assert plain["auc"] == pytest.approx(fp32["auc"], abs=1e-6)


def test_quantize_errors_are_one_line(runs, capsys):
    run = runs["dlrm"]
    assert rectrain(["eval", *run["args"], "--checkpoint", str(run["checkpoint"]), "--quantize", "int9"]) == 2
    assert "--quantize 'int9': use int8, int4, fp16" in _one_error(capsys)
    tt = ["--config", str(ROOT / "configs" / "two_tower_synth.toml")]
    assert rectrain(["eval", *tt, "--checkpoint", "/nonexistent", "--quantize", "int8"]) == 2
    assert "retrieval model" in _one_error(capsys)
    assert rectrain(["export", "ranking", *tt, "--checkpoint", "/nonexistent", "--out", "/tmp/never"]) == 2
    assert "rectrain export retrieval" in _one_error(capsys)


# --------------------------------------------------------------------------- export round trip


def _reference(run: dict, quantize: str | None, batch_rows: int) -> dict[str, np.ndarray]:
    """In-process predictions of the checkpoint's model (its tables quantized like the export's)
    over every eval row, in file order, on the batches `rectrain score --batch-rows` makes (the
    same rows in a batch of another size may round differently in the last bit: CPU GEMM
    blocking depends on the batch size, in process and exported alike)."""
    from data.parquet import table_to_batch
    from trainer.checkpoint import resolve_checkpoint
    from trainer.config import load_config
    from trainer.export.checkpoint_model import load_cpu_model
    from trainer.export.quantize import quantize_tables

    cfg = load_config(run["config"], _sets(run["overrides"])[1::2])
    model, schema = load_cpu_model(cfg, resolve_checkpoint(run["checkpoint"]))
    model = quantize_tables(model, quantize) if quantize else model
    parts: dict[str, list] = {}
    with torch.no_grad():
        for path in sorted(Path(run["eval"]).glob("*.parquet")):
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                batch = table_to_batch(pa.Table.from_batches([rb]), schema, str(path))
                for name, p in model.predictions(model(batch.dense, batch.sparse)).items():
                    parts.setdefault(name, []).append(p.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("name,quantize", [("dlrm", None), ("dlrm", "int8"), ("dcn_v2", None), ("dcn_v2", "int4"),
                                           ("mmoe", None), ("mmoe", "int8")])
def test_export_then_score_equals_in_process_scores(runs, capsys, name, quantize):
    """export -> score reproduces the in-process model bit for bit: the fp32 model for an fp32
    export, the in-process quantized model for a quantized one."""
    run = runs[name]
    out = run["root"] / f"export_{name}_{quantize or 'fp32'}"
    assert rectrain(["export", "ranking", *run["args"], "--checkpoint", str(run["checkpoint"]), "--out", str(out),
                     *(["--quantize", quantize] if quantize else [])]) == 0
    printed = _last_json(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "COMPLETE").is_file() and manifest["complete"]
    assert manifest["parity"]["exact"] and manifest["parity"]["passed"] and printed["parity"]["exact"]
    assert manifest["parity"]["rows"] == (1500 if name == "mmoe" else 4000)
    assert manifest["quantization"]["mode"] == (quantize or "none")
    assert manifest["inputs"]["id_policy"] == "modulo" and manifest["inputs"]["features"][0]["name"] == "cat_0"
    assert manifest["tasks"][0]["name"] == ("click" if name == "mmoe" else "label")
    ratio = manifest["sizes"]["table_ratio"]
    assert ratio == 1.0 if not quantize else ratio < 0.5
    if quantize:  # the gate reports the quantized model's AUC next to fp32's on its rows
        task = manifest["tasks"][0]["name"]
        auc = manifest["parity"]["auc"][task]
        assert auc["delta"] == pytest.approx(auc["exported"] - auc["fp32"])

    scores = run["root"] / f"scores_{name}_{quantize or 'fp32'}.parquet"
    assert rectrain(["score", "--export", str(out), "--data", str(run["eval"]), "--out", str(scores),
                     "--keep", "cat_0,cat_1", "--batch-rows", "700", "--no-progress"]) == 0
    assert "rows/s" in capsys.readouterr().out
    table = pq.read_table(scores)
    ref = _reference(run, quantize, 700)
    tasks = [t["name"] for t in manifest["tasks"]]
    assert table.column_names == ["cat_0", "cat_1", *[f"pred_{t}" for t in tasks],
                                  *(["pred_serving"] if len(tasks) > 1 else [])]
    for t in tasks:
        np.testing.assert_array_equal(table.column(f"pred_{t}").to_numpy(), ref[t])
    eval_rows = pq.read_table(run["eval"], columns=["cat_0", "cat_1"])
    assert table.select(["cat_0", "cat_1"]).equals(eval_rows)  # kept columns pass through, rows in order
    if len(tasks) > 1:  # the serving score: click + 0.5 like in mmoe_synth
        np.testing.assert_allclose(table.column("pred_serving").to_numpy(),
                                   ref["click"] + 0.5 * ref["like"], rtol=1e-6)


def _exported(runs, name: str, quantize: str | None) -> Path:
    """The complete export of `name` (the round-trip test's, or made now when run alone)."""
    run = runs[name]
    out = run["root"] / f"export_{name}_{quantize or 'fp32'}"
    if not (out / "COMPLETE").is_file():
        assert rectrain(["export", "ranking", *run["args"], "--checkpoint", str(run["checkpoint"]), "--out", str(out),
                         *(["--quantize", quantize] if quantize else [])]) == 0
    return out


def test_exported_model_loads_without_torchrec(runs):
    """model.pt needs torch (and fbgemm_gpu's kernels for quantized tables), not TorchRec."""
    out = _exported(runs, "dlrm", "int8")
    code = f"""
import sys, json
sys.modules["torchrec"] = None  # any import of TorchRec would fail
import torch, fbgemm_gpu
m = torch.jit.load({str(out / 'model.pt')!r})
values = torch.tensor([1, 2, 3, 4, 5], dtype=torch.int64)
lengths = torch.tensor([1, 0, 1, 1, 1, 0, 0, 1], dtype=torch.int32)  # 4 features x 2 rows
p = m(values, lengths, torch.randn(2, 4), None)["label"]
assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all()), p
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --------------------------------------------------------------------------- the gate, errors


def test_parity_gate_refuses_a_tampered_export(runs, capsys, monkeypatch, tmp_path):
    """An exported model that does not reproduce the in-process one is written for inspection but
    never marked complete (an earlier complete export in the directory loses its marker), and
    `rectrain score` refuses it."""
    import trainer.export.ranking as ranking

    run = runs["dlrm"]
    out = tmp_path / "export"
    shutil.copytree(_exported(runs, "dlrm", None), out)
    assert (out / "COMPLETE").is_file()
    real = ranking.build_scorer

    def tampered(*args, **kwargs):
        module = real(*args, **kwargs)
        bag = getattr(getattr(module.stages, "0").bags, "0")  # a new tensor: the scorer shares the model's
        bag.weight = torch.nn.Parameter(bag.weight.detach() + 1e-3, requires_grad=False)
        return module

    monkeypatch.setattr(ranking, "build_scorer", tampered)
    assert rectrain(["export", "ranking", *run["args"], "--checkpoint", str(run["checkpoint"]), "--out", str(out),
                     "--parity-rows", "1000"]) == 2
    err = _one_error(capsys)
    assert "parity gate failed" in err and "not marked complete" in err and "(tolerance 0)" in err, err
    assert not (out / "COMPLETE").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and not manifest["parity"]["passed"] and manifest["parity"]["rows"] == 1024
    assert rectrain(["score", "--export", str(out), "--data", str(run["eval"]), "--out", str(tmp_path / "s.parquet")]) == 2
    assert "not complete" in _one_error(capsys)
    assert not (tmp_path / "s.parquet").exists()


def test_score_errors_are_one_line(runs, capsys, tmp_path):
    run = runs["dlrm"]
    export = _exported(runs, "dlrm", None)
    cases = [
        (["--export", str(tmp_path / "none"), "--data", str(run["eval"])], "no manifest.json"),
        (["--export", str(export), "--data", str(run["eval"]), "--keep", "pred_label"], "already has a column"),
        (["--export", str(export), "--data", str(run["eval"]), "--keep", "nope"], "--keep column(s) ['nope']"),
        (["--export", str(export), "--data", str(tmp_path / "missing")], "no such file or directory"),
    ]
    for args, text in cases:
        assert rectrain(["score", *args, "--out", str(tmp_path / "s.parquet")]) == 2, args
        assert text in _one_error(capsys), args
    # a file without a feature column: the reader's own message names file and column
    table = pq.read_table(run["eval"]).drop(["cat_5"])
    pq.write_table(table, tmp_path / "bad.parquet")
    assert rectrain(["score", "--export", str(export), "--data", str(tmp_path / "bad.parquet"),
                     "--out", str(tmp_path / "s.parquet")]) == 2
    assert "column 'cat_5'" in _one_error(capsys)


def test_parity_gate_refuses_an_export_that_scores_nan(runs, capsys, monkeypatch, tmp_path):
    import trainer.export.ranking as ranking

    run = runs["dlrm"]
    real = ranking.build_scorer

    def poisoned(*args, **kwargs):
        module = real(*args, **kwargs)
        bag = getattr(getattr(module.stages, "0").bags, "0")
        bag.weight = torch.nn.Parameter(torch.full_like(bag.weight, float("nan")), requires_grad=False)
        return module

    monkeypatch.setattr(ranking, "build_scorer", poisoned)
    out = tmp_path / "export"
    assert rectrain(["export", "ranking", *run["args"], "--checkpoint", str(run["checkpoint"]), "--out", str(out),
                     "--parity-rows", "500"]) == 2
    assert "parity gate failed" in _one_error(capsys)
    assert not (out / "COMPLETE").exists()
