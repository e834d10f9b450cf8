"""`rectrain score`: Parquet rows -> per-task predictions in Parquet, through an exported ranking
model (`rectrain export ranking`), streaming.

Rows are read one record batch at a time, turned into the scorer's inputs by the training
reader's own code (data/parquet.table_to_batch with the export's schema: same id policy,
dense transform, missing-value handling, list caps and one-line errors naming file, column and
row), scored, and appended to OUT with the `--keep` columns copied through unchanged. Output
columns: the kept columns, then `pred_<task>` per task (float32: a probability for binary tasks,
the value for regression) and, for multi-task models, `pred_serving` (Σ serving_weight ×
prediction, the score a multi-task ranker sorts by).
OUT is written as OUT.partial and renamed when every row is scored.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import DataError
from trainer.errors import RunError

PREFIX = "pred_"  # output column of task t: pred_<t>


def load_export(directory: str | Path):
    """(the loaded TorchScript scorer, the manifest) of a complete export; one-line errors otherwise."""
    import torch

    from trainer.export.ranking import COMPLETE, MANIFEST, MODEL_FILE

    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise RunError(f"--export {d}: no {MANIFEST}; write one with `rectrain export ranking --out {d}`")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except ValueError as e:
        raise RunError(f"--export {d}: {MANIFEST} is not valid JSON ({e}); export again") from None
    if not manifest.get("format", "").startswith("rectrain-ranking-export/"):
        raise RunError(f"--export {d}: not a ranking export (format {manifest.get('format')!r}); `rectrain score` "
                       f"reads the output of `rectrain export ranking`")
    if not (d / COMPLETE).is_file() or not manifest.get("complete"):
        raise RunError(f"--export {d}: the export is not complete (its parity gate failed or it was interrupted; "
                       f"see parity in {MANIFEST}); export again")
    if "fbgemm_gpu" in manifest.get("needs", []):
        import fbgemm_gpu  # noqa: F401  (registers the quantized lookup kernels model.pt calls)
    try:
        module = torch.jit.load(str(d / MODEL_FILE), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f"--export {d}: cannot load {MODEL_FILE} ({first[:200]}); export again") from None
    return module.eval(), manifest


def _output_path(out: str) -> Path:
    p = Path(out)
    if p.is_dir():
        raise RunError(f"--out {out}: is a directory; give a file path such as {p / 'scores.parquet'}")
    if not p.parent.exists():
        raise RunError(f"--out {out}: directory {p.parent} does not exist; create it first")
    return p


def score(export: str | Path, data: str, out: str, keep: list[str] | None = None, batch_rows: int = 8192,
          progress: bool = True) -> dict:
    """Score every row of `data` (a Parquet file or directory, local or a pyarrow.fs URI) into
    `out`; returns {"rows", "files", "seconds", "rows_per_s", "out", "columns"}."""
    import torch
    from tqdm import tqdm

    from data.parquet import list_parquet_files, open_parquet, table_to_batch, validate_file_schema
    from trainer.export.ranking import run_scorer, schema_from_manifest

    if batch_rows < 1:
        raise RunError(f"--batch-rows {batch_rows}: must be >= 1")
    module, manifest = load_export(export)
    schema = schema_from_manifest(manifest["inputs"])
    tasks = manifest["tasks"]
    task_names = [t["name"] for t in tasks]
    multi = len(tasks) > 1
    pred_columns = [f"{PREFIX}{n}" for n in task_names] + ([f"{PREFIX}serving"] if multi else [])
    keep = list(dict.fromkeys(keep or []))
    clash = sorted(set(keep) & set(pred_columns))
    if clash:
        raise DataError(f"--keep {','.join(clash)}: the output already has a column of that name (the predictions "
                        f"{pred_columns}); keep other columns or rename them upstream")
    out_path = _output_path(out)
    fs, files = list_parquet_files(data)
    opened = []
    total = 0
    for path in files:
        f, pf, _ = open_parquet(fs, path)
        validate_file_schema(path, pf.schema_arrow, schema)
        missing = [c for c in keep if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: --keep column(s) {missing} not in the file; it has {pf.schema_arrow.names[:12]}"
                            f"{'...' if len(pf.schema_arrow.names) > 12 else ''}")
        opened.append((path, f, pf))
        total += pf.metadata.num_rows
    read_columns = list(dict.fromkeys([*schema.columns, *keep]))

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = None
    rows = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="rows", unit_scale=True, disable=not progress, file=sys.stderr,
               desc=f"score {Path(data).name}", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for path, f, pf in opened:
                first = 0
                for rb in pf.iter_batches(batch_size=batch_rows, columns=read_columns):
                    table = pa.Table.from_batches([rb])
                    start = first
                    batch = table_to_batch(table, schema, path, locate=lambda i, s=start, p=path: (p, s + i))
                    preds = run_scorer(module, batch)
                    cols = {c: table.column(c) for c in keep}
                    values = {n: preds[n].float().numpy() for n in task_names}
                    for n in task_names:
                        cols[PREFIX + n] = pa.array(values[n], pa.float32())
                    if multi:
                        serving = np.zeros(table.num_rows, dtype=np.float32)
                        for t in tasks:
                            if t["serving_weight"]:
                                serving += np.float32(t["serving_weight"]) * values[t["name"]]
                        cols[PREFIX + "serving"] = pa.array(serving, pa.float32())
                    out_table = pa.table(cols)
                    if writer is None:
                        writer = pq.ParquetWriter(str(tmp), out_table.schema)
                    writer.write_table(out_table)
                    rows += table.num_rows
                    first += table.num_rows
                    bar.update(table.num_rows)
                    bar.set_postfix_str(f"{rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s", refresh=False)
                f.close()
        if writer is None:  # no rows at all: still a valid (empty) file with the output columns
            fields = [pa.field(n, pa.float32()) for n in pred_columns]
            writer = pq.ParquetWriter(str(tmp), pa.schema(fields))
        writer.close()
        writer = None
        tmp.replace(out_path)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "files": len(files), "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None, "out": str(out_path),
            "columns": [*keep, *pred_columns]}
