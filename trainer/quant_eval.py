"""`rectrain eval --quantize int8|int4|fp16`: the checkpoint's metrics with its embedding tables
quantized after training (trainer/export/quantize.py), next to the fp32 model's, and the
tables' bytes before and after.

One process: the checkpoint (written at any world size) is loaded into the unsharded CPU model
(trainer/export/checkpoint_model.py), which is what TorchRec's quantized modules take, and both
models go through the same ranking evaluator (trainer/evaluate.evaluate) over every eval row.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.config import ConfigError, RunConfig


def parse_modes(text: str) -> list[str]:
    """`int8`, or several comma-separated (`int8,int4,fp16`); ConfigError naming the choices."""
    from trainer.export.quantize import QUANT_MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in QUANT_MODES]
    if not modes or bad:
        raise ConfigError(f"--quantize {text!r}: use {', '.join(QUANT_MODES)} (or several, comma-separated)")
    return list(dict.fromkeys(modes))


def _deltas(fp32: dict, quant: dict) -> dict:
    """quant - fp32 for every numeric metric, per task for multi-task results."""
    def diff(a: dict, b: dict) -> dict:
        return {k: b[k] - a[k] for k in a if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))
                and k != "num_samples"}

    out = diff(fp32, quant)
    if "tasks" in fp32:
        out["tasks"] = {t: diff(fp32["tasks"][t], quant["tasks"][t]) for t in fp32["tasks"]}
        out["serving"] = diff(fp32["serving"], quant["serving"])
    return out


def check_ranking_model(cfg: RunConfig, what: str) -> None:
    """One-line ConfigError for a retrieval model (before any checkpoint is read)."""
    from models.registry import is_retrieval_model

    if is_retrieval_model(cfg.model.name):
        raise ConfigError(f"{what}: {cfg.model.name!r} is a retrieval model; quantized evaluation and the ranking "
                          f"export are for ranking models (evaluate it without --quantize; export it with "
                          f"`rectrain export retrieval`)")


@torch.no_grad()
def quantized_eval(cfg: RunConfig, checkpoint: str | Path, data: str, modes: list[str]) -> dict:
    """{"fp32": metrics, "<mode>": metrics, ..., "delta": {mode: quant - fp32}, "table_bytes":
    {"fp32": n, "<mode>": n}, "table_ratio": {mode: bytes / fp32 bytes}}."""
    import fbgemm_gpu  # noqa: F401  (FBGEMM's quantized lookup kernels)

    from data.parquet import ParquetStream
    from trainer.evaluate import evaluate
    from trainer.export.checkpoint_model import load_cpu_model
    from trainer.export.quantize import quantize_tables, table_bytes
    from trainer.train_module import TrainModule

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("rectrain eval --quantize evaluates the unsharded model in one process (a checkpoint of "
                          "any world size loads into it); run it without torchrun / rectrain launch")
    check_ranking_model(cfg, "rectrain eval --quantize")
    model, schema = load_cpu_model(cfg, checkpoint)
    stream = ParquetStream(data, schema, batch_size=cfg.data.eval_batch_size, rank=0, world_size=1,
                           num_workers=cfg.data.num_workers, shuffle=False)
    cpu = torch.device("cpu")

    def run(m) -> dict:
        return evaluate(TrainModule(m, guard_non_finite=False), m.tasks, stream, cpu, cfg.eval.max_batches)

    result: dict = {"fp32": run(model)}
    sizes = {"fp32": table_bytes(model)}
    for mode in modes:
        q = quantize_tables(model, mode)
        result[mode] = run(q)
        sizes[mode] = table_bytes(q)
        del q
    result["delta"] = {m: _deltas(result["fp32"], result[m]) for m in modes}
    result["table_bytes"] = sizes
    result["table_ratio"] = {m: sizes[m] / sizes["fp32"] for m in modes}
    return result


def report_lines(result: dict, modes: list[str]) -> list[str]:
    """A small table: per task and metric, fp32 then each mode (with its delta); then the bytes."""
    def groups(metrics: dict) -> dict[str, dict]:
        if "tasks" in metrics:
            return {**metrics["tasks"], "serving": metrics["serving"]}
        return {"": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}

    fp32 = groups(result["fp32"])
    quant = {m: groups(result[m]) for m in modes}
    head = f"{'task':<12} {'metric':<15} {'fp32':>10}" + "".join(f" {m:>10} {'delta':>9}" for m in modes)
    lines = [head]
    for task, metrics in fp32.items():
        for name, value in metrics.items():
            if name == "num_samples" or not isinstance(value, (int, float)):
                continue
            row = f"{task or '-':<12} {name:<15} {value:>10.5f}"
            for m in modes:
                v = quant[m][task][name]
                row += f" {v:>10.5f} {v - value:>+9.5f}"
            lines.append(row)
    sizes = result["table_bytes"]
    lines.append(f"{'tables':<12} {'bytes':<15} {sizes['fp32']:>10}" +
                 "".join(f" {sizes[m]:>10} {result['table_ratio'][m]:>8.3f}x" for m in modes))
    return lines
