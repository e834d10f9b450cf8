"""`rectrain score`: Parquet rows -> per-task predictions in Parquet through an exported ranking
model (trainer/export/score.py): streaming, with a progress bar and rows/s."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    s = sub.add_parser("score", help="score Parquet rows with a `rectrain export ranking` directory")
    s.add_argument("--export", required=True, help="the --out directory of `rectrain export ranking`")
    s.add_argument("--data", required=True, help="a Parquet file or directory (local or a pyarrow.fs URI)")
    s.add_argument("--out", required=True, help="the Parquet file to write")
    s.add_argument("--keep", default="", help="columns copied through to the output, comma-separated "
                                              "(e.g. request_id,item_id)")
    s.add_argument("--batch-rows", type=int, default=8192, help="rows scored at a time (default 8192)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    from trainer.export.score import score

    keep = [c.strip() for c in args.keep.split(",") if c.strip()]
    result = score(args.export, args.data, args.out, keep, args.batch_rows, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"scored {result['rows']} rows from {result['files']} file(s) in {result['seconds']:.2f} s "
              f"({result['rows_per_s'] or 0:,.0f} rows/s) -> {result['out']} (columns {', '.join(result['columns'])})")
    return 0
