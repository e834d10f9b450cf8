"""Sharding: planner topology and per-table constraints from the config, DMP wrapping, and the
`rectrain plan` dry run."""

from __future__ import annotations

import os
from collections import defaultdict

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from trainer.config import ConfigError, RunConfig
from trainer.precision import (keep_data_parallel_fp32, qcomm_registry, set_table_dtype,
                               table_fused_params)

GPU_ONLY_TYPES = ("row_wise", "table_row_wise")
_FUSED_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "sgd": EmbOptimType.EXACT_SGD,
}


def fused_params(cfg: RunConfig) -> dict:
    """FBGEMM fused-optimizer settings: the embedding update runs inside the backward kernel
    (with L2 weight decay on the rows a step touches, when configured)."""
    params = {
        "optimizer": _FUSED_OPTIMIZERS[cfg.optimizer.embedding],
        "learning_rate": cfg.optimizer.embedding_lr,
        "eps": cfg.optimizer.embedding_eps,
    }
    if cfg.optimizer.embedding_weight_decay:
        params["weight_decay"] = cfg.optimizer.embedding_weight_decay
        params["weight_decay_mode"] = WeightDecayMode.L2
    params.update(table_fused_params(cfg.precision))
    return params


def make_sharders(cfg: RunConfig, device_type: str = "cuda") -> list:
    if device_type == "cpu" and cfg.optimizer.embedding == "adam":
        raise ConfigError("config key 'optimizer.embedding': FBGEMM's CPU kernels have no fused Adam; "
                          "use rowwise_adagrad or sgd on CPU (adam works on GPU)")
    return [EmbeddingBagCollectionSharder(fused_params=fused_params(cfg), qcomm_codecs_registry=qcomm_registry(cfg.precision))]


def model_tables(model: nn.Module) -> dict[str, str]:
    """Every embedding table the (unsharded) model holds -> the `model.tables` entry it derives
    from. Models may add tables of their own over the same features (DeepFM's `fm1_*`, Wide&Deep's
    `wide_*`); each feature belongs to one configured table, so a table's first feature names it."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for t in module.embedding_bag_configs():
                tables[t.name] = t.feature_names[0]
    return tables


def make_constraints(cfg: RunConfig, device_type: str,
                     model: nn.Module | None = None) -> dict[str, ParameterConstraints]:
    """Planner constraints from `[sharding]`, for every table of `model` (a derived table follows
    the table it derives from), or for `model.tables` alone."""
    owner = {f: t.name for t in cfg.model.tables for f in t.features}
    tables = ({name: owner[feature] for name, feature in model_tables(model).items()} if model is not None
              else {t.name: t.name for t in cfg.model.tables})
    constraints = {}
    for name, base in tables.items():
        stype = cfg.sharding.type_for(base)
        entry = cfg.sharding.tables.get(base)
        kernel = entry.kernel if entry else ""
        if device_type == "cpu" and stype in GPU_ONLY_TYPES:
            key = f"sharding.tables.{base}.type" if entry and entry.type else "sharding.default_type"
            raise ConfigError(f"config key '{key}': {stype} sharding runs only on GPUs (TorchRec's CPU kernels "
                              f"lack it); on CPU use table_wise, column_wise or data_parallel")
        if device_type == "cpu" and kernel.startswith("fused_uvm"):
            raise ConfigError(f"config key 'sharding.tables.{base}.kernel': {kernel} needs a GPU; use 'fused'")
        if stype or kernel:
            constraints[name] = ParameterConstraints(
                sharding_types=[stype] if stype else None,
                compute_kernels=[kernel] if kernel else None,
            )
    return constraints


def make_planner(cfg: RunConfig, world_size: int, device_type: str, local_world_size: int | None = None,
                 batch_size: int | None = None, model: nn.Module | None = None) -> EmbeddingShardingPlanner:
    kwargs = {}
    if cfg.sharding.hbm_cap_gb:
        kwargs["hbm_cap"] = int(cfg.sharding.hbm_cap_gb * 2**30)
    if cfg.sharding.ddr_cap_gb:
        kwargs["ddr_cap"] = int(cfg.sharding.ddr_cap_gb * 2**30)
    topology = Topology(
        world_size=world_size,
        compute_device=device_type,
        local_world_size=local_world_size or world_size,
        **kwargs,
    )
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size or cfg.data.batch_size,
        constraints=make_constraints(cfg, device_type, model),
    )


def shard_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan collectively (every rank agrees on rank 0's plan) and wrap in DMP, which materializes
    the meta-device model: sharded tables on their ranks, DDP around the dense part."""
    pg = dist.GroupMember.WORLD
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    planner = make_planner(cfg, world_size, device.type, local_world_size=local_world_size, model=model)
    sharders = make_sharders(cfg, device.type)
    # The tables' storage dtype (the sharder's kernels allocate it). The planner still sizes shards by
    # the meta weights' fp32 element size, so its memory estimate for fp16 tables is conservative (2x).
    set_table_dtype(model, cfg.precision.embeddings)
    plan = planner.collective_plan(model, sharders, pg)
    keep_data_parallel_fp32(model, plan)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    return dmp, plan


# --------------------------------------------------------------------------- plan reporting


def plan_rows(plan: ShardingPlan) -> list[dict]:
    """One row per table: sharding type, kernel, ranks and shard shapes."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            rows.append({
                "module": module_path,
                "table": table,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else "all",
                "shards": [list(s.shard_sizes) for s in shards],
            })
    return rows


def memory_per_rank(planner: EmbeddingShardingPlanner) -> dict[int, dict[str, int]]:
    """Bytes per rank as the planner estimated them (weights, optimizer state, I/O buffers)."""
    per_rank: dict[int, dict[str, int]] = defaultdict(lambda: {"hbm": 0, "ddr": 0})
    for option in planner._best_plan or []:
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                per_rank[shard.rank]["hbm"] += int(shard.storage.hbm)
                per_rank[shard.rank]["ddr"] += int(shard.storage.ddr)
    return dict(sorted(per_rank.items()))


def dry_run(cfg: RunConfig, model: nn.Module, world_size: int, device_type: str) -> dict:
    """Run the planner without a process group or training; return tables and memory per rank."""
    # The estimators read device properties only through the Topology, so planning for GPUs
    # works on a machine without them.
    planner = make_planner(cfg, world_size, device_type, model=model)
    sharders = make_sharders(cfg, device_type)
    set_table_dtype(model, cfg.precision.embeddings)
    plan = planner.plan(model, sharders)
    return {
        "world_size": world_size,
        "device": device_type,
        "tables": plan_rows(plan),
        "memory_per_rank": memory_per_rank(planner),
        "plan": plan,
    }


def format_plan_rows(rows: list[dict]) -> str:
    lines = [f"{'table':<24} {'sharding':<15} {'kernel':<18} {'ranks':<14} shards"]
    for r in rows:
        ranks = r["ranks"] if r["ranks"] == "all" else ",".join(map(str, r["ranks"]))
        shards = " ".join("x".join(map(str, s)) for s in r["shards"]) or "replicated"
        lines.append(f"{r['table']:<24} {r['sharding_type']:<15} {r['compute_kernel']:<18} {str(ranks)[:14]:<14} {shards}")
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    lines = [f"sharding plan for world size {result['world_size']} ({result['device']})", "",
             format_plan_rows(result["tables"])]
    lines += ["", f"{'rank':<6} {'hbm (GiB)':>12} {'ddr (GiB)':>12}"]
    for rank, mem in result["memory_per_rank"].items():
        lines.append(f"{rank:<6} {mem['hbm'] / 2**30:>12.3f} {mem['ddr'] / 2**30:>12.3f}")
    return "\n".join(lines)
