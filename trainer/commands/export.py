"""`rectrain export retrieval`: a two-tower checkpoint -> item vectors, a TorchScript query
tower, FAISS indexes and its own measured recall (trainer/export/retrieval.py).
`rectrain export ranking`: a ranking checkpoint -> a TorchScript scorer (fp32 or quantized
tables) that passed its parity gate, and manifest.json (trainer/export/ranking.py)."""

from __future__ import annotations

from trainer.commands.common import add_config_args


def add_parser(sub) -> None:
    ex = sub.add_parser("export", help="export a trained model for serving")
    kinds = ex.add_subparsers(dest="export_kind", required=True)
    r = kinds.add_parser("retrieval", help="two-tower checkpoint -> item vectors, query tower (TorchScript), FAISS "
                                           "index, measured recall")
    add_config_args(r)
    r.add_argument("--checkpoint", required=True, help="a step_<N> directory or a checkpoints directory (latest)")
    r.add_argument("--out", required=True, help="export directory (created; files in it are replaced)")
    r.add_argument("--index", default="ivf_flat", choices=("flat", "ivf_flat", "ivf_pq", "hnsw"),
                   help="the ANN index built beside the exact one (default ivf_flat)")
    r.add_argument("--nlist", type=int, default=0, help="IVF lists (default ~4 sqrt(items), >= 39 items per list)")
    r.add_argument("--nprobe", type=int, default=0, help="IVF lists searched (default a quarter of nlist)")
    r.add_argument("--pq-m", type=int, default=0, help="IVF-PQ sub-quantizers, a divisor of the dim (default dim/2)")
    r.add_argument("--pq-bits", type=int, default=0, help="IVF-PQ bits per code (default 8, fewer for small catalogs)")
    r.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    r.add_argument("--ef-search", type=int, default=0, help="HNSW search breadth (default 64)")
    r.add_argument("--sweep", action="store_true", help="also print recall vs latency for a few nprobe / efSearch")

    k = kinds.add_parser("ranking", help="ranking checkpoint -> TorchScript scorer (fp32 or int8/int4/fp16 tables) "
                                         "gated on parity with the in-process model, plus manifest.json")
    add_config_args(k)
    k.add_argument("--checkpoint", required=True, help="a step_<N> directory or a checkpoints directory (latest)")
    k.add_argument("--out", required=True, help="export directory (created; files in it are replaced)")
    k.add_argument("--quantize", default=None, choices=("int8", "int4", "fp16"),
                   help="quantize the embedding tables row-wise (default: fp32)")
    k.add_argument("--data", default=None, help="rows for the parity gate (default: data.eval_path)")
    k.add_argument("--parity-rows", type=int, default=4096, help="rows the parity gate scores (default 4096)")


def _check_args(args) -> None:
    from trainer.errors import RunError

    for flag in ("nlist", "nprobe", "pq_m", "pq_bits", "ef_search"):
        if getattr(args, flag) < 0:
            raise RunError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0 (0 picks the default)")
    if args.pq_bits > 16:
        raise RunError(f"--pq-bits {args.pq_bits}: use at most 16 (8 is the usual)")


def _ranking(args) -> int:
    import json

    from trainer.config import load_config
    from trainer.export.ranking import export_ranking, summary_lines

    cfg = load_config(args.config, args.overrides)
    manifest = export_ranking(cfg, args.checkpoint, args.out, args.quantize, args.data, args.parity_rows)
    for line in summary_lines(manifest):
        print(line)
    print(json.dumps({k: manifest[k] for k in ("model", "checkpoint", "quantization", "sizes", "parity")}))
    return 0


def run(args) -> int:
    if args.export_kind == "ranking":
        return _ranking(args)
    from trainer.config import load_config
    from trainer.export.faiss_index import IndexParams
    from trainer.export.retrieval import export_retrieval

    _check_args(args)
    cfg = load_config(args.config, args.overrides)
    params = IndexParams(kind=args.index, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, pq_bits=args.pq_bits,
                         hnsw_m=args.hnsw_m, ef_search=args.ef_search)
    export_retrieval(cfg, args.checkpoint, args.out, params, sweep=args.sweep)
    return 0
