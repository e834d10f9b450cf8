"""FAISS indexes over the exported item vectors, and search that leaves out each user's seen items.

Vectors are L2-normalised tower outputs, so inner product is cosine similarity; every index uses
METRIC_INNER_PRODUCT. A FAISS label is the item's row in items.parquet (0..N-1), never its raw id.

Kinds (``--index``):
  flat      exact brute force (always written as index_flat.faiss: the reference for recall)
  ivf_flat  inverted lists over `nlist` k-means cells, `nprobe` of them searched
  ivf_pq    the same with product-quantised residuals (`pq_m` sub-vectors of `pq_bits` bits)
  hnsw      a navigable small-world graph with `hnsw_m` links per node, `ef_search` candidates
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.errors import RunError

INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RunError("faiss is not installed; run scripts/install.sh (it installs faiss-cpu) or "
                       "`pip install faiss-cpu`") from None
    return faiss


@dataclass
class IndexParams:
    """The ANN index's settings; 0 means "pick a default for this catalog" (`resolve`)."""

    kind: str = "ivf_flat"
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    hnsw_m: int = 32
    ef_search: int = 0
    ef_construction: int = 80

    def resolve(self, num_items: int, dim: int) -> "IndexParams":
        """Defaults for a catalog of `num_items` vectors of `dim`: nlist ~ 4 sqrt(N) but at
        least ~39 training points per cell (fewer makes k-means noisy), nprobe a quarter of the
        lists; pq_m the largest divisor of dim giving sub-vectors of >= 2 dims (32 codes for a
        64-dim vector: 8x smaller than float32 and close to exact on small catalogs), pq_bits 8
        (fewer only for catalogs of under 256 items)."""
        if self.kind not in INDEX_KINDS:
            raise RunError(f"--index {self.kind!r}: use one of {', '.join(INDEX_KINDS)}")
        p = IndexParams(**asdict(self))
        n = max(1, num_items)
        if p.kind in ("ivf_flat", "ivf_pq"):
            if p.nlist <= 0:
                p.nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
            if p.nlist > n:
                raise RunError(f"--nlist {p.nlist}: more lists than the {n} items; use at most {n}")
            if p.nprobe <= 0:
                p.nprobe = max(1, math.ceil(p.nlist / 4))
            p.nprobe = min(p.nprobe, p.nlist)
        if p.kind == "ivf_pq":
            if p.pq_m <= 0:
                p.pq_m = max([m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= 2] or [1])
            if dim % p.pq_m:
                raise RunError(f"--pq-m {p.pq_m} does not divide the embedding dim {dim}; pick a divisor of {dim}")
            if p.pq_bits <= 0:
                # 2^bits centroids per sub-quantizer need at least as many training vectors
                # (FAISS warns below 39 each, but fewer bits cost far more recall than that)
                p.pq_bits = int(max(1, min(8, math.floor(math.log2(max(2, n))))))
        if p.kind == "hnsw":
            if p.hnsw_m <= 0:
                raise RunError(f"--hnsw-m {p.hnsw_m}: must be a positive integer (e.g. 32)")
            if p.ef_search <= 0:
                p.ef_search = 64
        return p

    def describe(self) -> dict:
        """The settings that apply to this kind (for metadata and the console)."""
        keys = {"flat": (), "ivf_flat": ("nlist", "nprobe"), "ivf_pq": ("nlist", "nprobe", "pq_m", "pq_bits"),
                "hnsw": ("hnsw_m", "ef_search", "ef_construction")}[self.kind]
        return {"kind": self.kind, **{k: getattr(self, k) for k in keys}}


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """float32 C-contiguous [N, d], as FAISS wants it."""
    return np.ascontiguousarray(vectors, dtype=np.float32)


def build_flat(vectors: np.ndarray):
    """Exact inner-product index over [N, d] vectors."""
    faiss = _faiss()
    x = as_matrix(vectors)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def build_index(vectors: np.ndarray, params: IndexParams):
    """The index `params.kind` (resolved), trained on and filled with `vectors` [N, d]."""
    faiss = _faiss()
    x = as_matrix(vectors)
    n, d = x.shape
    if params.kind == "flat":
        return build_flat(x)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(x)
    else:
        quantizer = faiss.IndexFlatIP(d)
        if params.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, params.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, params.nlist, params.pq_m, params.pq_bits,
                                     faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0  # reproducible k-means
        index.train(x)
        index.add(x)
    set_search_param(index, params)
    return index


def set_search_param(index, params: IndexParams, value: int | None = None) -> None:
    """Set nprobe (IVF) or efSearch (HNSW) to `value`, or to the resolved default."""
    faiss = _faiss()
    if params.kind in ("ivf_flat", "ivf_pq"):
        faiss.extract_index_ivf(index).nprobe = int(value or params.nprobe)
    elif params.kind == "hnsw":
        index.hnsw.efSearch = int(value or params.ef_search)


def search_param_name(kind: str) -> str | None:
    return {"ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "ef_search"}.get(kind)


def write_index(index, path: Path) -> int:
    """Write `index` to `path`; its size in bytes."""
    _faiss().write_index(index, str(path))
    return path.stat().st_size


def read_index(path: Path):
    faiss = _faiss()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index; run `rectrain export retrieval` into that directory")
    return faiss.read_index(str(path))


def search_excluding(index, queries: np.ndarray, k: int,
                     exclude: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top `k` rows per query [Q, d] with each query's `exclude` rows (item row numbers) left
    out: search k + (that query's number of excluded rows), drop them, keep the first k. Returns
    (rows int64 [Q, k], scores float32 [Q, k]); -1 / -inf where the index returned fewer (an
    ANN index may, when its probed cells hold too few items). Queries are searched in groups
    of similar exclusion size so a user who saw 1000 items does not widen everyone's search."""
    q = as_matrix(queries)
    num_q = q.shape[0]
    n = index.ntotal
    rows_out = np.full((num_q, k), -1, dtype=np.int64)
    scores_out = np.full((num_q, k), -np.inf, dtype=np.float32)
    if num_q == 0:
        return rows_out, scores_out
    excl = exclude if exclude is not None else [np.zeros(0, dtype=np.int64)] * num_q
    extra = np.array([len(e) for e in excl], dtype=np.int64)
    # groups by the power of two above the exclusion count: at most 2x wasted width
    bucket = np.where(extra > 0, np.ceil(np.log2(np.maximum(extra, 1))) + 1, 0).astype(np.int64)
    for b in np.unique(bucket):
        members = np.flatnonzero(bucket == b)
        width = int(min(n, k + int(extra[members].max())))
        scores, rows = index.search(q[members], width)
        for j, i in enumerate(members):
            r, s = rows[j], scores[j]
            keep = r >= 0
            if len(excl[i]):
                keep &= ~np.isin(r, excl[i])
            r, s = r[keep][:k], s[keep][:k]
            rows_out[i, :len(r)] = r
            scores_out[i, :len(s)] = s
    return rows_out, scores_out


def timed_search(index, queries: np.ndarray, k: int, exclude: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """(rows [Q, k], mean milliseconds per query) of `search_excluding`."""
    t0 = time.perf_counter()
    rows, _ = search_excluding(index, queries, k, exclude)
    return rows, (time.perf_counter() - t0) * 1000.0 / max(1, len(queries))


def sweep_values(params: IndexParams) -> list[int]:
    """The nprobe / efSearch values `--sweep` tries: powers of two up to the useful maximum,
    plus the chosen value."""
    if params.kind in ("ivf_flat", "ivf_pq"):
        top = params.nlist
        values = {1, params.nprobe, top}
    elif params.kind == "hnsw":
        top = 512
        values = {params.ef_search, 16}
    else:
        return []
    v = 2
    while v < top:
        values.add(v)
        v *= 2
    return sorted(x for x in values if x <= top)
