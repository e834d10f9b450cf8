"""`rectrain data ...`: synthesize, inspect and convert click logs to Parquet."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="synthesize, inspect or convert Parquet click logs")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser("synth", help="write a synthetic click log with a planted signal")
    synth.add_argument("--out", required=True)
    synth.add_argument("--rows", type=int, required=True)
    synth.add_argument("--schema", default="criteo",
                       help="criteo: Criteo-shaped, one label; multitask: click, like and watch_time; two_tower: "
                            "retrieval data (OUT/train, OUT/eval, OUT/items, meta.json) with planted item clusters")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--files", type=int, default=1, help="train files (criteo and multitask schemas)")
    synth.add_argument("--row-group-rows", type=int, default=8192)

    inspect = data_sub.add_parser("inspect", help="schema, row counts, id ranges and nulls per column")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    criteo = data_sub.add_parser("criteo", help="convert Criteo TSV (Kaggle train.txt, 1TB day_N[.gz]) to Parquet")
    criteo.add_argument("--src", required=True, help="a file or a directory of day files")
    criteo.add_argument("--out", required=True)
    criteo.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    criteo.add_argument("--row-group-rows", type=int, default=65536)
    criteo.add_argument("--rows-per-file", type=int, default=4_000_000)
    criteo.add_argument("--json", action="store_true", help="print the report as JSON")

    movielens = data_sub.add_parser("movielens", help="a multi-task click log or two-tower retrieval data from a "
                                                      "MovieLens release")
    movielens.add_argument("--src", required=True, help="e.g. ../shared/data/movielens-latest-small")
    movielens.add_argument("--out", required=True)
    movielens.add_argument("--task", choices=("multitask", "retrieval"), default="multitask",
                           help="multitask: one row per rating with labels; retrieval: positives with histories, "
                                "eval users with targets, and the item catalog")
    movielens.add_argument("--test-fraction", type=float, default=0.2,
                           help="each user's latest fraction of ratings (retrieval: of positives) goes to eval")
    movielens.add_argument("--max-tags", type=int, default=None, help="multitask: tags kept per row (default 20)")
    movielens.add_argument("--max-history", type=int, default=None,
                           help="retrieval: latest positives kept in a row's history (default 50)")
    movielens.add_argument("--min-rating", type=float, default=None,
                           help="retrieval: ratings at or above this are positives (default 4.0)")


def run(args) -> int:
    return {"synth": _synth, "inspect": _inspect, "criteo": _criteo, "movielens": _movielens}[args.data_command](args)


def _synth(args) -> int:
    from data.synth import write_synthetic

    if args.schema == "two_tower":
        from data.retrieval import summary
        from data.synth import write_two_tower

        print(json.dumps(summary(write_two_tower(args.out, args.rows, seed=args.seed,
                                                 row_group_rows=args.row_group_rows))))
        return 0
    paths = write_synthetic(args.out, args.rows, seed=args.seed, files=args.files,
                            row_group_rows=args.row_group_rows, schema=args.schema)
    print(f"wrote {args.rows} rows ({args.schema} schema) to {len(paths)} file(s) under {args.out}")
    return 0


def _inspect(args) -> int:
    from data.inspect import format_report, inspect_dataset

    report = inspect_dataset(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report.get("problems") else 0  # scripts can gate on a clean dataset


def _criteo(args) -> int:
    from data.criteo import convert_criteo, format_criteo_report

    report = convert_criteo(args.src, args.out, workers=args.workers, row_group_rows=args.row_group_rows,
                            rows_per_file=args.rows_per_file, progress=not args.json)
    print(json.dumps(report) if args.json else format_criteo_report(report))
    return 0


def _movielens(args) -> int:
    from data.schema import DataError

    if args.task == "retrieval":
        from data.movielens import POSITIVE_RATING, convert_movielens_retrieval
        from data.retrieval import summary

        if args.max_tags is not None:
            raise DataError("--max-tags is for --task multitask (retrieval rows carry no tags); drop it")
        meta = convert_movielens_retrieval(
            args.src, args.out, test_fraction=args.test_fraction,
            max_history=50 if args.max_history is None else args.max_history,
            min_rating=POSITIVE_RATING if args.min_rating is None else args.min_rating)
        print(json.dumps(summary(meta)))
        return 0
    from data.movielens import convert_movielens

    for flag, value in (("--max-history", args.max_history), ("--min-rating", args.min_rating)):
        if value is not None:
            raise DataError(f"{flag} is for --task retrieval; drop it or add --task retrieval")
    max_tags = 20 if args.max_tags is None else args.max_tags
    report = convert_movielens(args.src, args.out, test_fraction=args.test_fraction, max_tags=max_tags)
    print(json.dumps(report, default=str))
    return 0
