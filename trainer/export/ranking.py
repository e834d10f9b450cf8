"""`rectrain export ranking`: a ranking checkpoint -> a TorchScript scorer (fp32, or its tables
quantized to int8/int4/fp16) that has proved itself equal to the in-process model.

OUT/
  model.pt       TorchScript RankingScorer (trainer/export/ranking_module.py)
  manifest.json  model, checkpoint, inputs (schema, id policy, dense transform), tasks,
                 quantization, sizes, parity (see `export_ranking`)
  COMPLETE       written last, only when the parity gate passed; `rectrain score` refuses an
                 export without it

The parity gate: the first `parity_rows` rows of the eval data go through the in-process model
(the checkpoint's unsharded CPU model; for --quantize, that model with its tables quantized the
same way) and through model.pt as loaded back from disk. Every task's predictions must be
identical for an fp32 export (the same kernels on the same inputs) and agree within
QUANTIZED_TOLERANCE (1e-6; in practice identical too) for a quantized one; a NaN fails. For quantized exports the manifest also gives the AUC of each binary task on those rows
next to the fp32 model's, and the difference.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from trainer.checkpoint import step_of
from trainer.config import ConfigError, RunConfig
from trainer.errors import RunError
from trainer.export import write_json

log = logging.getLogger("rectrain")
FORMAT = "rectrain-ranking-export/1"
MODEL_FILE = "model.pt"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FP32_TOLERANCE = 0.0
QUANTIZED_TOLERANCE = 1e-6


def inputs_manifest(schema) -> dict:
    """What `rectrain score` needs to turn raw columns into the scorer's inputs exactly as the
    training reader did: the features in input order with their table sizes and weight columns,
    the dense columns, the id policy and the reader's transforms."""
    return {
        "features": [{"name": f.name, "num_embeddings": f.num_embeddings, "weight_column": f.weight_column}
                     for f in schema.features],
        "dense_columns": list(schema.dense_columns),
        "num_dense": schema.num_dense,
        "id_policy": schema.id_policy,
        "dense_transform": schema.dense_transform,
        "dense_missing": schema.dense_missing,
        "max_list_length": schema.max_list_length,
        "list_overflow": schema.list_overflow,
    }


def schema_from_manifest(inputs: dict, passthrough: tuple[str, ...] = ()):
    """The reader Schema of an export's inputs (no labels; NaN/inf dense values are errors, so
    the output keeps one row per input row)."""
    from data.schema import FeatureSpec, Schema

    return Schema(label_columns=(), dense_columns=tuple(inputs["dense_columns"]),
                  features=tuple(FeatureSpec(f["name"], int(f["num_embeddings"]), f.get("weight_column"))
                                 for f in inputs["features"]),
                  id_policy=inputs["id_policy"], dense_transform=inputs["dense_transform"],
                  dense_missing=inputs["dense_missing"], binary_labels=(), non_finite="error",
                  max_list_length=int(inputs["max_list_length"]), list_overflow=inputs["list_overflow"],
                  passthrough=passthrough)


def run_scorer(module, batch) -> dict[str, torch.Tensor]:
    """The exported module on a reader Batch (its KJT is the scorer's input layout)."""
    kjt = batch.sparse
    return module(kjt.values(), kjt.lengths(), batch.dense, kjt.weights_or_none())


def sample_batches(cfg: RunConfig, schema, path: str, rows: int, batch_size: int = 1024):
    """The first `rows` rows of `path` (in file order), as reader Batches, labels included."""
    from data.parquet import ParquetStream

    stream = ParquetStream(path, schema, batch_size=batch_size, rank=0, world_size=1, num_workers=0, shuffle=False)
    stream.set_epoch(0)
    seen = 0
    for batch in stream:
        if batch.all_dropped:
            continue
        yield batch
        seen += batch.batch_size
        if seen >= rows:
            return


@torch.no_grad()
def parity_check(module, reference, fp32_model, tasks, batches) -> dict:
    """Score `batches` with the exported `module` and the in-process `reference` (and the fp32
    model when `reference` is quantized): per task the max |difference|, and for binary tasks
    the AUC of each on these rows."""
    from models.metrics import ScoreAUC

    diffs = {t.name: 0.0 for t in tasks}
    binary = [t for t in tasks if t.kind == "binary"]
    aucs = {kind: {t.name: ScoreAUC(torch.device("cpu")) for t in binary} for kind in ("exported", "fp32")}
    rows = 0
    for batch in batches:
        ours = run_scorer(module, batch)
        ref = reference.predictions(reference(batch.dense, batch.sparse))
        full = ref if fp32_model is None else fp32_model.predictions(fp32_model(batch.dense, batch.sparse))
        mask = batch.weights > 0
        for t in tasks:
            d = (ours[t.name].float() - ref[t.name].float()).abs().nan_to_num(nan=math.inf)  # NaN never passes
            diffs[t.name] = max(diffs[t.name], float(d[mask].max()) if mask.any() else 0.0)
        for t in binary:
            label = t.label(batch.labels)
            aucs["exported"][t.name].update(ours[t.name].float(), label, mask)
            aucs["fp32"][t.name].update(full[t.name].float(), label, mask)
        rows += int(mask.sum())
    auc = {}
    for t in binary:
        ex, fp = float(aucs["exported"][t.name].compute()), float(aucs["fp32"][t.name].compute())
        auc[t.name] = {"exported": ex, "fp32": fp, "delta": ex - fp}
    worst = max(diffs.values()) if diffs else 0.0
    tolerance = FP32_TOLERANCE if fp32_model is None else QUANTIZED_TOLERANCE
    return {"rows": rows, "tolerance": tolerance, "max_abs_diff": diffs, "exact": worst == 0.0,
            "passed": rows > 0 and math.isfinite(worst) and worst <= tolerance, "auc": auc}


def export_ranking(cfg: RunConfig, checkpoint: str | Path, out: str | Path, quantize: str | None = None,
                   data: str | None = None, parity_rows: int = 4096) -> dict:
    """Write the export of `checkpoint` to `out`; return its manifest (see the module docstring).
    Raises RunError (nothing marked complete) when the parity gate fails."""
    import fbgemm_gpu  # noqa: F401  (the quantized kernels and KJT ops)
    import torchrec

    from trainer.checkpoint import resolve_checkpoint
    from trainer.export.checkpoint_model import load_cpu_model
    from trainer.export.quantize import quantize_tables, table_bytes
    from trainer.quant_eval import check_ranking_model

    check_ranking_model(cfg, "rectrain export ranking")
    t_start = time.perf_counter()
    path = data or cfg.data.eval_path
    if not path:
        raise ConfigError("export ranking: no eval data for the parity gate; pass --data PATH or set data.eval_path")
    if parity_rows < 1:
        raise ConfigError(f"--parity-rows {parity_rows}: the gate needs at least 1 row")
    ckpt = resolve_checkpoint(checkpoint)
    model, schema = load_cpu_model(cfg, ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)  # whatever was here is no longer a complete export

    reference = model if not quantize else quantize_tables(model, quantize)
    features = [(f.name, f.num_embeddings) for f in schema.features]
    scripted = build_scorer(reference, features, schema.num_dense, schema.weighted)
    scripted.save(str(out / MODEL_FILE))
    loaded = torch.jit.load(str(out / MODEL_FILE))  # the gate checks the file, not the object
    parity = parity_check(loaded, reference, model if quantize else None, model.tasks,
                          sample_batches(cfg, schema, path, parity_rows))

    fp32_bytes, exported_bytes = table_bytes(model), table_bytes(reference)
    manifest = {
        "format": FORMAT,
        "model": cfg.model.name,
        "checkpoint": str(ckpt.resolve()),
        "step": step_of(ckpt),
        "file": MODEL_FILE,
        "format_notes": "TorchScript; inputs (values, lengths, dense, weights) in the KJT layout of inputs.features, "
                        "ids mapped by inputs.id_policy; outputs {task: probability (binary) or value}",
        "needs": ["torch", "fbgemm_gpu"] if quantize else ["torch"],
        "inputs": inputs_manifest(schema),
        "tasks": [{"name": t.name, "kind": t.kind, "serving_weight": t.serving_weight} for t in model.tasks],
        "quantization": {"mode": quantize or "none",
                         "scheme": "row-wise (per-row fp16 scale and bias)" if quantize in ("int8", "int4") else
                         ("fp16 rows" if quantize == "fp16" else "fp32"),
                         "dense": "fp32"},
        "sizes": {"table_bytes_fp32": fp32_bytes, "table_bytes": exported_bytes,
                  "table_ratio": exported_bytes / fp32_bytes if fp32_bytes else None,
                  "model_file_bytes": (out / MODEL_FILE).stat().st_size},
        "parity": {**parity, "data": str(path)},
        "versions": {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"),
                     "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?")},
        "complete": False,
        "config": cfg.to_dict(),
    }
    if not parity["passed"]:
        write_json(out / MANIFEST, manifest)
        if parity["rows"] == 0:
            raise RunError(f"export ranking: the parity gate read no rows from {path}; point --data at eval rows")
        task, diff = max(parity["max_abs_diff"].items(), key=lambda kv: kv[1])
        raise RunError(f"export ranking: parity gate failed: {out / MODEL_FILE} differs from the in-process "
                       f"{quantize or 'fp32'} model by {diff:.3g} on task {task!r} over {parity['rows']} rows "
                       f"(tolerance {parity['tolerance']:g}); the export is not marked complete")
    manifest["complete"] = True
    manifest["export_seconds"] = round(time.perf_counter() - t_start, 3)
    write_json(out / MANIFEST, manifest)
    (out / COMPLETE).write_text(f"{manifest['model']} {quantize or 'fp32'} parity max_abs_diff "
                                f"{max(parity['max_abs_diff'].values()):.3g} over {parity['rows']} rows\n")
    return manifest


def build_scorer(model, features, num_dense: int, weighted: bool):
    """trainer/export/ranking_module.build_scorer (a name here so tests can tamper with it)."""
    from trainer.export.ranking_module import build_scorer as build

    return build(model, features, num_dense, weighted)


def summary_lines(manifest: dict) -> list[str]:
    q = manifest["quantization"]["mode"]
    p, s = manifest["parity"], manifest["sizes"]
    lines = [f"export ranking: {manifest['model']} ({q}) -> {manifest['file']}: tables {s['table_bytes'] / 1e6:.2f} MB "
             f"({s['table_ratio']:.3f}x of fp32 {s['table_bytes_fp32'] / 1e6:.2f} MB), file {s['model_file_bytes'] / 1e6:.2f} MB",
             f"parity: {p['rows']} rows, max |exported - in-process| = "
             f"{max(p['max_abs_diff'].values()):.3g} ({'exact' if p['exact'] else 'within'} tolerance {p['tolerance']:g})"]
    for task, a in p["auc"].items():
        lines.append(f"  {task}: AUC {a['exported']:.5f} vs fp32 {a['fp32']:.5f} (delta {a['delta']:+.5f})")
    return lines


