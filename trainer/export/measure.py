"""The export measures itself: Recall@K over the eval users through the exported files (the
TorchScript query tower, items.parquet, the FAISS indexes), exact vs ANN, and with --sweep
recall vs latency for a few nprobe / efSearch values.

Recall@K as in trainer/retrieval_eval.py: per user, hits in the top K / number of held-out
targets (targets missing from the catalog count as misses), averaged over the eval users; each
user's seen items are excluded (searched K + number seen, then filtered). Exact recall here is
the trained model's eval recall up to ties and float rounding: the loop is closed.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from trainer.export import faiss_index
from trainer.export.serving import RetrievalExport

log = logging.getLogger("rectrain")


def recall(rows: np.ndarray, targets: list[np.ndarray], num_targets: np.ndarray, k: int) -> float:
    """rows [U, >=k] item rows; targets: each user's target rows (in the catalog); num_targets
    [U]: all of each user's targets (those missing from the catalog too)."""
    total = 0.0
    for r, t, n in zip(rows, targets, num_targets):
        top = r[:k]
        total += float(np.isin(t, top[top >= 0]).sum()) / max(int(n), 1)
    return total / max(len(num_targets), 1)


def measure(export: RetrievalExport, ks: list[int], sweep: bool, single_queries: int = 100) -> dict:
    """{"ks", "users", "exact": {recall@K, ms_per_query}, "ann": {...}, "single_query_ms": {...},
    "sweep": [...]} over the export's users."""
    users = export.users
    rows = users.rows()
    t0 = time.perf_counter()
    queries = export.encode(rows, where=str(export.dir / "users.parquet"))
    encode_ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(rows))
    seen = [export.seen_rows(s) for s in users.lists(users.seen_column)]
    raw_targets = users.lists(users.targets_column)
    targets = [export.seen_rows(t) for t in raw_targets]
    num_targets = np.array([len(t) for t in raw_targets], dtype=np.int64)
    kmax = max(ks)
    result: dict = {"ks": ks, "users": len(rows), "targets": int(num_targets.sum()),
                    "targets_not_in_catalog": int(num_targets.sum() - sum(len(t) for t in targets)),
                    "encode_ms_per_query": encode_ms}
    for which in ("flat", "ann"):
        found, ms = faiss_index.timed_search(export.index(which), queries, kmax, seen)
        entry = {f"recall@{k}": recall(found, targets, num_targets, k) for k in ks}
        entry["search_ms_per_query"] = ms
        result["exact" if which == "flat" else "ann"] = entry
    exact, ann = result["exact"], result["ann"]
    result["ann_vs_exact"] = {f"recall@{k}": (ann[f"recall@{k}"] / exact[f"recall@{k}"] if exact[f"recall@{k}"] else None)
                              for k in ks}
    result["single_query_ms"] = _single_query_ms(export, rows[:single_queries], users)
    if sweep:
        result["sweep"] = _sweep(export, queries, seen, targets, num_targets, ks)
    return result


def _single_query_ms(export: RetrievalExport, rows: list[dict], users) -> dict:
    """Median encode + search time of one query at a time (what `retrieve` pays per user)."""
    out = {}
    k = 10
    for which in ("flat", "ann"):
        times = []
        for row in rows:
            _, enc, search = export.retrieve(row, k, row.get(users.seen_column) or [], which)
            times.append(enc + search)
        out[which] = float(np.median(times)) if times else None
    return out


def _sweep(export, queries, seen, targets, num_targets, ks) -> list[dict]:
    params = export.ann_params()
    name = faiss_index.search_param_name(params.kind)
    index = export.index("ann")
    out = []
    for value in faiss_index.sweep_values(params):
        faiss_index.set_search_param(index, params, value)
        found, ms = faiss_index.timed_search(index, queries, max(ks), seen)
        out.append({name: value, **{f"recall@{k}": recall(found, targets, num_targets, k) for k in ks},
                    "search_ms_per_query": ms})
    faiss_index.set_search_param(index, params)
    return out


def report_lines(result: dict, params: faiss_index.IndexParams) -> list[str]:
    """The console summary of `measure`."""
    ks = result["ks"]
    lines = [f"recall over {result['users']} eval users ({result['targets']} targets, "
             f"{result['targets_not_in_catalog']} not in the catalog), seen items excluded:"]
    for label, key in (("exact (flat)", "exact"), (f"ann ({params.kind})", "ann")):
        e = result[key]
        lines.append(f"  {label:<16} " + "  ".join(f"recall@{k}={e[f'recall@{k}']:.4f}" for k in ks)
                     + f"  search {e['search_ms_per_query']:.3f} ms/query (batched)")
    ratio = result["ann_vs_exact"]
    lines.append("  ann / exact      " + "  ".join(
        f"recall@{k}={ratio[f'recall@{k}']:.3f}" if ratio[f"recall@{k}"] is not None else f"recall@{k}=n/a" for k in ks))
    single = result["single_query_ms"]
    if single.get("flat") is not None:
        lines.append(f"  one query (encode + search, median): flat {single['flat']:.2f} ms, ann {single['ann']:.2f} ms")
    if result.get("sweep"):
        name = faiss_index.search_param_name(params.kind)
        lines.append(f"sweep ({params.kind}: {name} vs recall and latency):")
        for row in result["sweep"]:
            lines.append(f"  {name}={row[name]:<5} " + "  ".join(f"recall@{k}={row[f'recall@{k}']:.4f}" for k in ks)
                         + f"  {row['search_ms_per_query']:.3f} ms/query")
    return lines
