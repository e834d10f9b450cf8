"""Throughput of `data.criteo.convert_criteo` on a generated Criteo-layout TSV file.

Writes `--lines` lines (default 1M, about 200 MB) in the Kaggle train.txt layout into a
temporary directory, with Criteo-like empties, small and negative counts and one malformed
line in 10,000, converts it and prints rows/s and the malformed counts. Numbers, not checks.

    .venv/bin/python scripts/bench_criteo_convert.py [--lines N] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.criteo import convert_criteo, format_criteo_report  # noqa: E402

MALFORMED_EVERY = 10_000
BAD_LINES = ("1\tabc" + "\t" * 38, "0\t1\t2", "1" + "\t" * 13 + "\tzz12ab34" + "\t" * 25)


def _field_pool(rng: np.random.Generator, size: int, hex_field: bool) -> np.ndarray:
    """Distinct field strings to draw from: hashes, or heavy-tailed counts with -1s; 5% empty."""
    if hex_field:
        values = [f"{v:08x}" for v in rng.integers(0, 2**32, size)]
    else:
        values = [str(v) for v in np.floor(np.expm1(rng.exponential(2.0, size))).astype(np.int64)]
        values[-size // 50:] = ["-1"] * (size // 50)
    values[: size // 20] = [""] * (size // 20)
    return np.array(values, dtype=object)


def write_tsv(path: Path, lines: int, seed: int = 0) -> int:
    """Write `lines` Criteo lines; returns how many are malformed."""
    rng = np.random.default_rng(seed)
    pools = [_field_pool(rng, 4096, hex_field=j >= 13) for j in range(39)]
    malformed = 0
    with open(path, "w") as f:
        for lo in range(0, lines, 100_000):
            n = min(100_000, lines - lo)
            cols = [np.where(rng.random(n) < 0.25, "1", "0").astype(object)]
            cols += [pool[rng.integers(0, len(pool), n)] for pool in pools]
            rows = ["\t".join(fields) for fields in zip(*cols)]
            for k in range(lo % MALFORMED_EVERY and MALFORMED_EVERY - lo % MALFORMED_EVERY, n, MALFORMED_EVERY):
                rows[k] = BAD_LINES[malformed % len(BAD_LINES)]
                malformed += 1
            f.write("\n".join(rows) + "\n")
    return malformed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=0, help="0: every core")
    ap.add_argument("--keep", help="write the TSV and Parquet here instead of a temporary directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        src = root / "train.txt"
        t0 = time.perf_counter()
        planted = write_tsv(src, args.lines)
        print(f"generated {args.lines:,} lines ({src.stat().st_size / 1e6:.0f} MB, {planted} malformed) "
              f"in {time.perf_counter() - t0:.1f} s")
        report = convert_criteo(src, root / "parquet", workers=args.workers)
        print(format_criteo_report(report))
        print(f"rows/s: {report['rows_per_s']:,.0f} with {report['workers']} worker(s) on {os.cpu_count()} cores; "
              f"malformed: {report['malformed']} counted, {planted} planted")


if __name__ == "__main__":
    main()
