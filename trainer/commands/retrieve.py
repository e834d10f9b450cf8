"""`rectrain retrieve`: top-K items for one user from an export directory (no TorchRec, no
checkpoint: the TorchScript query tower, the id policy from metadata.json, FAISS)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    r = sub.add_parser("retrieve", help="top-K items for a user from a `rectrain export retrieval` directory")
    r.add_argument("--export", required=True, help="the --out directory of `rectrain export retrieval`")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="a user id of the eval data (looked up in EXPORT/users.parquet)")
    who.add_argument("--features", help='raw query features as JSON, e.g. \'{"user_id": 3, "history": [1, 2, 3]}\'; '
                                       'an optional "seen" list is excluded (default: the history items)')
    r.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    r.add_argument("--include-seen", action="store_true", help="do not exclude the user's seen items")
    r.add_argument("--index", default="flat", choices=("flat", "ann"),
                   help="exact search (flat, default) or the export's ANN index")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def parse_features(text: str) -> dict:
    """The --features JSON object; DataError naming the problem."""
    from data.schema import DataError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"--features is not valid JSON ({e.msg} at character {e.pos}); write an object such as "
                        f"'{{\"user_id\": 3, \"history\": [1, 2, 3]}}'") from None
    if not isinstance(value, dict):
        raise DataError(f"--features must be a JSON object of feature name -> id(s), got {type(value).__name__}")
    return value


def run(args) -> int:
    from data.schema import DataError
    from trainer.export.serving import RetrievalExport

    if args.k < 1:
        raise DataError(f"--k {args.k}: must be >= 1")
    export = RetrievalExport(args.export)
    known = {f.name for f in export.inputs.features} | set(export.inputs.dense_columns)
    if args.user is not None:
        row = export.users.find(args.user, str(export.dir / "users.parquet"))
        seen = row.get(export.metadata["seen_column"]) or []
        where = f"user {args.user}"
    else:
        row = parse_features(args.features)
        seen_key = export.metadata["seen_column"]
        unknown = sorted(set(row) - known - {seen_key})
        if unknown:
            raise DataError(f"--features: unknown feature(s) {unknown}; the query tower reads {sorted(known)} "
                            f"(and an optional {seen_key!r} list)")
        seen = row.get(seen_key) if seen_key in row else export.history_items(row)
        if not isinstance(seen, list):
            seen = [seen]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in seen):
            raise DataError(f"--features: {seen_key!r} must be a list of integer item ids, got {seen!r}")
        where = "--features"
    if args.include_seen:
        seen = []
    hits, encode_ms, search_ms = export.retrieve(row, args.k, seen, args.index, where)
    if args.json:
        print(json.dumps({"user": args.user, "k": args.k, "index": args.index, "excluded": len(seen),
                          "items": [h.item_id for h in hits], "scores": [h.score for h in hits],
                          "titles": [h.title for h in hits] if export.items.titles is not None else None,
                          "encode_ms": encode_ms, "search_ms": search_ms, "latency_ms": encode_ms + search_ms}))
        return 0
    print(f"top {len(hits)} of {len(export.items.item_ids)} items for {where} ({args.index} index, "
          f"{len(seen)} seen items excluded):")
    for rank, h in enumerate(hits, 1):
        title = f"  {h.title}" if h.title else ""
        print(f"{rank:>4}  item {h.item_id:<8} score {h.score:.4f}{title}")
    print(f"latency: {encode_ms + search_ms:.2f} ms (encode {encode_ms:.2f} ms + search {search_ms:.2f} ms)")
    return 0
