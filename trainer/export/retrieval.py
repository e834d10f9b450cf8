"""`rectrain export retrieval`: a trained two-tower checkpoint -> a directory that serves queries
without TorchRec, and that has measured itself.

OUT/
  items.parquet      item_id, vector [d], title?   (trainer/export/items.py)
  query_tower.pt     TorchScript query tower        (trainer/export/query_encoder.py)
  index_flat.faiss   exact inner-product index (always)
  index_<kind>.faiss the ANN index (ivf_flat | ivf_pq | hnsw; none for --index flat)
  users.parquet      the eval users' raw query features, targets and seen lists (users.py)
  metadata.json      see `export_retrieval`
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from trainer.checkpoint import step_of
from trainer.config import ConfigError, RunConfig
from trainer.export import faiss_index, write_json
from trainer.export.faiss_index import IndexParams
from trainer.export.serving import FLAT_INDEX, ITEMS, METADATA, QUERY_TOWER, USERS, RetrievalExport, ann_file

log = logging.getLogger("rectrain")
FORMAT = "rectrain-retrieval-export/1"
_CONTRACT = ("query_features", "candidate_features", "item_id_feature", "sparse", "feature_table", "feature_pooling",
             "uses_dense", "query_mlp", "encode_query", "encode_candidate")


def eval_ks(cfg: RunConfig) -> list[int]:
    """The retrieval task's top_k, always with 10 (the K every report quotes)."""
    task = next((t for t in cfg.model.tasks if t.kind == "retrieval"), None)
    return sorted(set(task.top_k if task else []) | {10})


def export_retrieval(cfg: RunConfig, checkpoint: str | Path, out: str | Path, params: IndexParams,
                     sweep: bool = False) -> dict:
    """Write the export of `checkpoint` (a step dir or a checkpoints dir: the latest) to `out`
    and return its metadata:
      format, model, checkpoint, step, dim, num_items, num_users, item_id_feature,
      history_features (query features that look up the item table: excluded when retrieve is
      given raw --features without "seen"), query_inputs (features with tables, sizes, pooling;
      dense columns and transform; id_policy, max_list_length: what `retrieve` needs to map raw
      ids), targets_column, seen_column, index {exact: {kind, file}, ann: {kind, params..., file}},
      query_tower_max_abs_error (vs the model's encode_query on a random batch), recall (see
      measure.py), files {name: bytes}, total_bytes, export_seconds, config (the run config)."""
    from trainer.checkpoint import resolve_checkpoint
    from trainer.export.checkpoint_model import load_cpu_model
    from trainer.export.items import embed_catalog
    from trainer.export.measure import measure, report_lines
    from trainer.export.query_encoder import (RawQueryInputs, build_query_tower, check_query_tower, query_features,
                                              random_inputs, script_query_tower)
    from trainer.export.users import read_eval_users

    t_start = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    model, schema = load_cpu_model(cfg, ckpt)
    missing = [a for a in _CONTRACT if not hasattr(model, a)]
    if missing:
        raise ConfigError(f"config key 'model.name': export retrieval needs a two-tower retrieval model; "
                          f"{cfg.model.name!r} lacks {missing}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}

    items = embed_catalog(cfg, model, schema)
    sizes[ITEMS] = items.write(out / ITEMS)
    n, dim = items.vectors.shape
    log.info("export: %d item vectors of dim %d -> %s", n, dim, out / ITEMS)

    features = query_features(model)
    tower = build_query_tower(model)
    example = random_inputs(features, 8, schema.num_dense)
    module = script_query_tower(tower, example)
    err = check_query_tower(module, model, features, schema.num_dense)
    module.save(str(out / QUERY_TOWER))
    sizes[QUERY_TOWER] = (out / QUERY_TOWER).stat().st_size

    sizes[FLAT_INDEX] = faiss_index.write_index(faiss_index.build_flat(items.vectors), out / FLAT_INDEX)
    resolved = params.resolve(n, dim)
    ann_name = ann_file(resolved.kind) if resolved.kind != "flat" else FLAT_INDEX
    t0 = time.perf_counter()
    if resolved.kind != "flat":
        sizes[ann_name] = faiss_index.write_index(faiss_index.build_index(items.vectors, resolved), out / ann_name)
    build_s = time.perf_counter() - t0

    users = read_eval_users(cfg, model.query_features)
    sizes[USERS] = users.write(out / USERS)

    item_table = model.feature_table[model.item_id_feature]
    raw_inputs = RawQueryInputs(tuple(features), tuple(schema.dense_columns), schema.id_policy,
                                schema.dense_transform, schema.dense_missing, schema.max_list_length)
    metadata = {
        "format": FORMAT,
        "model": cfg.model.name,
        "checkpoint": str(ckpt.resolve()),
        "step": step_of(ckpt),
        "dim": int(dim),
        "num_items": int(n),
        "num_users": len(users),
        "item_id_feature": model.item_id_feature,
        "history_features": [f.name for f in features if f.table == item_table],
        "query_inputs": raw_inputs.to_dict(),
        "targets_column": cfg.data.targets_column,
        "seen_column": cfg.data.seen_column,
        "has_titles": items.titles is not None,
        "index": {"exact": {"kind": "flat", "file": FLAT_INDEX},
                  "ann": {**asdict(resolved), "file": ann_name, "build_seconds": round(build_s, 3)}},
        "query_tower_max_abs_error": err,
        "config": cfg.to_dict(),
    }
    write_json(out / METADATA, metadata)  # measure() loads the export through its metadata

    export = RetrievalExport(out)
    result = measure(export, eval_ks(cfg), sweep)
    metadata["recall"] = result
    metadata["files"] = sizes
    metadata["total_bytes"] = sum(sizes.values())
    metadata["export_seconds"] = round(time.perf_counter() - t_start, 3)
    write_json(out / METADATA, metadata)
    for line in report_lines(result, resolved):
        log.info("%s", line)
    log.info("export: %s (%s) -> %s: %d items, %d users, %.1f MB", ckpt, cfg.model.name, out, n, len(users),
             metadata["total_bytes"] / 1e6)
    return metadata


