"""`rectrain data criteo`: convert the original Criteo click-log TSV layout to row-grouped Parquet.

Input: Criteo Kaggle ``train.txt`` and Criteo 1TB ``day_N`` / ``day_N.gz`` (gzip is streamed).
One sample per line, 40 tab-separated fields: the label (0/1), I1..I13 integer counts, then
C1..C26 categorical hashes of 8 hex digits. Kaggle ``test.txt`` has no label (39 fields):
convert it with ``has_label=False``; with the default, each of its lines is reported as
malformed ("expected 40 fields, got 39") and the report says what to do.

Output schema, the same names as `data.synth` writes:

- ``label``: int64, 0 or 1 (no such column with ``has_label=False``).
- ``dense_0..dense_12`` (I1..I13): float32; an empty field is null; negative values (-1, -2)
  are kept as they are. Counts above 2**24 round to the nearest float32.
- ``cat_0..cat_25`` (C1..C26): int64, the hash read as an unsigned 32-bit number
  (``68fd1e64`` -> 0x68fd1e64 = 1761418852), so always in [0, 2**32); an empty field is null.
  Upper-case hex digits are accepted too.

Malformed lines are never written: they are skipped, counted per input file, and the first
``show_bad_lines`` of each file are reported with their 1-based line number in that file and
the reason. A line is malformed when it has the wrong number of fields (an empty line too),
its label is not exactly ``0`` or ``1``, an integer field is not ``-?[0-9]+`` with at most 18
digits (``abc``, ``1.5``, ``+3``), or a categorical field is not exactly 8 hex digits. Empty
fields are not malformed. A trailing ``\\r`` (CRLF line ends) is dropped. An empty file, or
one without a single good line, is named in the report's warnings.

Which files: `src` is one file, or a directory whose regular, non-hidden files are taken in
natural order (``day_2`` before ``day_10``; subdirectories are not searched). If the directory
holds Criteo-named files (``train.txt``, ``day_N``, ``day_N.gz``), only those are converted
and the others (``test.txt``, ``readme.txt``) are listed in the warnings as skipped.

Work split and output order: an uncompressed file is cut into byte ranges aligned to line
starts (about 64 per file, each at least 32 MiB, or `chunk_bytes`); a gzip file is one range.
A process pool converts the ranges in parallel, each into its own files of at most
`rows_per_file` rows and row groups of exactly `row_group_rows` rows (but the last of each
file). The files are then renamed ``part-00000.parquet``, ``part-00001.parquet``, ... in
(input file, byte range) order. So reading the parts in name order gives the good lines in
input order, and since the ranges depend only on the input, the output is the same whatever
the number of workers. Memory stays bounded: each worker holds a few 16 MiB blocks of lines.

Parsing is vectorized over a block of lines with numpy: tab and newline positions give every
field's byte span; fields are loaded eight bytes at a time through an overlapping uint64 view
of the block and decoded with bit tricks (SWAR). Only integers longer than 8 characters, which
Criteo practically never has, take a per-field Python path.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import DataError
from data.synth import NUM_DENSE, NUM_SPARSE, dense_columns, sparse_columns

_RANGES_PER_FILE = 64
_MIN_RANGE_BYTES = 32 << 20
_BLOCK_BYTES = 16 << 20
_CRITEO_NAME = re.compile(r"(train\.txt|day_\d+)(\.gz)?")
_LONG_INT = re.compile(rb"-?[0-9]{1,18}")
_PARTIAL = ".parquet.partial"  # not *.parquet: a killed run's leftovers are never read as data

_NL, _CR, _TAB, _MINUS = 10, 13, 9, 45
_PAD = 8  # bytes of zeros around a block, so 8-byte loads at any field stay inside the buffer
_ZEROS = np.uint64(0x3030303030303030)  # "00000000"
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_SIXES = np.uint64(0x0606060606060606)
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
# _KEEP[k] keeps bytes k..7 of a little-endian word, i.e. drops its first k characters.
_KEEP = np.array([~((1 << (8 * k)) - 1) & (2**64 - 1) for k in range(9)], dtype=np.uint64)
_HEX = np.full(256, 0xFF, dtype=np.uint8)  # character -> nibble, 0xFF for a non-hex character
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def output_schema(has_label: bool = True) -> pa.Schema:
    """The converted dataset's columns: label, dense_0..12 (float32), cat_0..25 (int64)."""
    fields = [pa.field("label", pa.int64())] if has_label else []
    fields += [pa.field(c, pa.float32()) for c in dense_columns()]
    fields += [pa.field(c, pa.int64()) for c in sparse_columns()]
    return pa.schema(fields)


# --------------------------------------------------------------------------- parsing a block


def _words(buf: np.ndarray) -> np.ndarray:
    """Overlapping little-endian uint64 view: element i holds bytes i..i+7 of `buf`."""
    return np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _parse_ints(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal fields at byte spans [start, end) (any shape) -> (int64 values, malformed).

    Each field is loaded as the 8 bytes that end where it ends; the bytes before the field
    (and a leading '-') are replaced by '0', so "-12" becomes "00000012" and negated. Fields
    longer than 8 characters are rare and parsed one by one. Empty fields read as 0, not bad.
    """
    length = end - start
    neg = (length > 0) & (buf[start] == _MINUS)
    drop = np.clip(8 - length + neg, 0, 8)
    keep = _KEEP[drop]
    x = (_words(buf)[end - 8] & keep) | (_ZEROS & ~keep)
    # every byte is 0x30..0x39: high nibble 3, and adding 6 does not carry into the high nibble
    digits = ((x & _HIGH_NIBBLES) == _ZEROS) & (((x + _SIXES) & _HIGH_NIBBLES) == _ZEROS)
    v = x & _LOW_NIBBLES  # byte 0 holds the most significant digit
    v = (v * 10 + (v >> 8)) & np.uint64(0x00FF00FF00FF00FF)
    v = (v * 100 + (v >> 16)) & np.uint64(0x0000FFFF0000FFFF)
    v = (v * 10000 + (v >> 32)) & np.uint64(0xFFFFFFFF)
    values = v.astype(np.int64)
    values = np.where(neg, -values, values)
    bad = ~digits | (neg & (length == 1))
    for idx in zip(*np.nonzero(length > 8)):
        text = buf[start[idx]:end[idx]].tobytes()
        ok = _LONG_INT.fullmatch(text) is not None
        values[idx] = int(text) if ok else 0
        bad[idx] = not ok
    return values, bad


def _parse_hex(buf: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-hex-digit fields starting at `start` (any shape) -> (int64 values, malformed).

    Empty fields are not malformed (their value is garbage; the caller masks them as null).
    """
    nib = _HEX[_words(buf)[start].view(np.uint8)].view(np.uint64)  # byte j = nibble of character j
    bad = (((nib & _HIGH_NIBBLES) != 0) | (length != 8)) & (length != 0)
    # pair nibbles: byte 2m becomes output byte m, most significant first
    even = np.uint64(0x000F000F000F000F)
    t = ((nib & even) << np.uint64(4)) | ((nib >> np.uint64(8)) & even)
    ff = np.uint64(0xFF)
    v = ((t & ff) << np.uint64(24)) | (((t >> np.uint64(16)) & ff) << np.uint64(16))
    v |= (((t >> np.uint64(32)) & ff) << np.uint64(8)) | ((t >> np.uint64(48)) & ff)
    return v.astype(np.int64), bad


@dataclass
class _Block:
    """One parsed block: the good rows, the block's line count, and its malformed lines."""

    table: pa.Table
    lines: int
    bad: np.ndarray  # 0-based line indices in the block, sorted
    reasons: list[str]  # for the first `limit` of `bad`


def _field_name(col: int, has_label: bool) -> str:
    k = col - int(has_label)
    if k < 0:
        return "label"
    return f"I{k + 1}" if k < NUM_DENSE else f"C{k - NUM_DENSE + 1}"


def _reason(buf: np.ndarray, col: int, start: int, end: int, has_label: bool) -> str:
    name = _field_name(col, has_label)
    text = buf[start:end].tobytes().decode("utf-8", "replace")
    text = text if len(text) <= 24 else text[:21] + "..."
    if name == "label":
        return f"label {text!r} is not 0 or 1"
    if name.startswith("I"):
        return f"{name} {text!r} is not an integer"
    return f"{name} {text!r} is not 8 hex digits"


def _parse_block(data: bytes, has_label: bool, limit: int) -> _Block:
    """Whole lines of Criteo TSV -> their good rows as a table, plus the malformed lines."""
    lab = int(has_label)
    nf = lab + NUM_DENSE + NUM_SPARSE
    buf = np.zeros(len(data) + 2 * _PAD, dtype=np.uint8)
    body = buf[_PAD:_PAD + len(data)]
    body[:] = np.frombuffer(data, dtype=np.uint8)
    # all positions below are indices into `buf`
    ends = np.flatnonzero(body == _NL) + _PAD
    if data and data[-1] != _NL:  # the file's last line has no newline
        ends = np.append(ends, _PAD + len(data))
    starts = np.concatenate([[_PAD], ends[:-1] + 1])[:len(ends)]
    ends = ends - ((ends > starts) & (buf[ends - 1] == _CR))
    tabs = np.flatnonzero(body == _TAB) + _PAD
    n_tabs = np.diff(np.searchsorted(tabs, starts), append=len(tabs))  # every tab is inside a line

    shape_ok = n_tabs == nf - 1
    ok = np.flatnonzero(shape_ok)  # lines with the right field count
    sep = (tabs if len(ok) == len(ends) else tabs[np.repeat(shape_ok, n_tabs)]).reshape(len(ok), nf - 1).T
    fstart = np.empty((nf, len(ok)), dtype=np.int64)  # [field, line]: one contiguous row per field
    fend = np.empty_like(fstart)
    fstart[0], fstart[1:] = starts[ok], sep + 1
    fend[:-1], fend[-1] = sep, ends[ok]
    flen = fend - fstart

    bad = np.zeros(fstart.shape, dtype=bool)
    label = buf[fstart[0]].astype(np.int64) - ord("0")  # first byte of field 0; used only with a label
    if has_label:
        bad[0] = (flen[0] != 1) | ((label != 0) & (label != 1))
    dense = slice(lab, lab + NUM_DENSE)
    ints, bad[dense] = _parse_ints(buf, fstart[dense], fend[dense])
    cat = slice(lab + NUM_DENSE, nf)
    hashes, bad[cat] = _parse_hex(buf, fstart[cat], flen[cat])

    line_bad = bad.any(axis=0)
    if line_bad.any():  # rare: most blocks need no copy
        keep = ~line_bad
        label, ints, hashes, flen = label[keep], ints[:, keep], hashes[:, keep], flen[:, keep]
    columns: list[pa.Array] = [pa.array(label)] if has_label else []
    columns += [pa.array(v.astype(np.float32), mask=n == 0) for v, n in zip(ints, flen[dense])]
    columns += [pa.array(v, mask=n == 0) for v, n in zip(hashes, flen[cat])]
    table = pa.Table.from_arrays(columns, schema=output_schema(has_label))

    bad_lines = np.sort(np.concatenate([np.flatnonzero(~shape_ok), ok[line_bad]]))
    reasons = []
    for line in bad_lines[:limit]:
        if not shape_ok[line]:
            empty = starts[line] == ends[line]
            reasons.append("empty line" if empty else f"expected {nf} fields, got {n_tabs[line] + 1}")
            continue
        j = np.searchsorted(ok, line)
        col = int(np.argmax(bad[:, j]))
        reasons.append(_reason(buf, col, fstart[col, j], fend[col, j], has_label))
    return _Block(table, len(ends), bad_lines, reasons)


# --------------------------------------------------------------------------- one byte range


@dataclass(frozen=True)
class _Range:
    """Lines of `path` that start in bytes [start, end) (decompressed bytes for gzip)."""

    path: str
    start: int
    end: int


@dataclass(frozen=True)
class _Options:
    has_label: bool
    row_group_rows: int
    rows_per_file: int
    show_bad_lines: int
    block_bytes: int


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_lines(r: _Range, block_bytes: int) -> Iterator[bytes]:
    """Blocks of whole lines covering exactly the lines that start inside the range."""
    with _open(r.path) as f:
        if r.start > 0:
            f.seek(r.start - 1)
            f.readline()  # the line holding byte start-1 belongs to the range before
        pos = f.tell()
        carry = b""
        while pos < r.end:
            data = f.read(min(block_bytes, r.end - pos))
            if not data:
                break
            pos += len(data)
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut:
                yield data[:cut]
            carry = data[cut:]
        if carry:  # a line that starts before `end` (or the file's unterminated last line)
            yield carry + f.readline()


class _PartWriter:
    """Numbered Parquet files of at most `rows_per_file` rows in row groups of `row_group_rows`.

    Incoming tables are buffered until a whole row group is ready, so every row group but a
    file's last has exactly `row_group_rows` rows whatever the sizes of the blocks.
    """

    def __init__(self, stem: str, schema: pa.Schema, row_group_rows: int, rows_per_file: int) -> None:
        self.stem, self.schema = stem, schema
        self.row_group_rows, self.rows_per_file = row_group_rows, rows_per_file
        self.paths: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def _group_rows(self) -> int:
        return min(self.row_group_rows, self.rows_per_file - self._in_file)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        while self._pending_rows >= self._group_rows():
            self._flush(self._group_rows())

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        if self._writer is None:
            self.paths.append(f"{self.stem}-{len(self.paths):05d}{_PARTIAL}")
            self._writer = pq.ParquetWriter(self.paths[-1], self.schema, compression="zstd",
                                            write_page_checksum=True)
        self._writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows -= n
        self._in_file += n
        if self._in_file == self.rows_per_file:
            self._writer.close()
            self._writer, self._in_file = None, 0

    def close(self) -> list[str]:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
        return self.paths


def _convert_range(index: int, r: _Range, tmp_dir: str, opt: _Options) -> dict:
    """Convert one range into `tmp_dir/range-<index>-*.partial`; line numbers are range-relative."""
    writer = _PartWriter(os.path.join(tmp_dir, f"range-{index:06d}"), output_schema(opt.has_label),
                         opt.row_group_rows, opt.rows_per_file)
    lines = malformed = 0
    bad_lines: list[dict] = []
    try:
        for data in _read_lines(r, opt.block_bytes):
            block = _parse_block(data, opt.has_label, opt.show_bad_lines - len(bad_lines))
            bad_lines += [{"line": lines + int(i) + 1, "reason": s} for i, s in zip(block.bad, block.reasons)]
            lines += block.lines
            malformed += len(block.bad)
            writer.write(block.table)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{r.path}: cannot read ({e}); if it is a truncated or corrupt download, "
                        f"fetch it again or move it out of --src") from None
    files = writer.close()
    return {"lines": lines, "rows": lines - malformed, "malformed": malformed, "bad_lines": bad_lines,
            "files": files}


# --------------------------------------------------------------------------- planning


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _input_files(src: Path) -> tuple[list[Path], list[Path]]:
    """(files to convert, files skipped because Criteo-named files sit beside them)."""
    if not src.exists():
        raise DataError(f"{src}: no such file or directory; pass --src a Criteo train.txt, day_N or "
                        f"day_N.gz file, or a directory of them")
    if src.is_file():
        return [src], []
    files = sorted((f for f in src.iterdir() if f.is_file() and not f.name.startswith(".")), key=_natural_key)
    named = [f for f in files if _CRITEO_NAME.fullmatch(f.name)]
    if named:
        return named, [f for f in files if f not in named]
    if not files:
        raise DataError(f"{src}: directory holds no input files; put train.txt or day_N(.gz) files in it "
                        f"or pass --src one file")
    return files, []


def _plan(files: list[Path], chunk_bytes: int | None) -> list[_Range]:
    """Byte ranges in input order: gzip files whole, others cut so that all cores get work."""
    ranges = []
    for path in files:
        if path.name.endswith(".gz"):
            ranges.append(_Range(str(path), 0, sys.maxsize))
            continue
        size = path.stat().st_size
        step = chunk_bytes or max(_MIN_RANGE_BYTES, -(-size // _RANGES_PER_FILE))
        ranges += [_Range(str(path), s, min(s + step, size)) for s in range(0, max(size, 1), step)]
    return ranges


def _prepare_out(out: Path) -> str:
    """Create `out` and a private temporary directory in it; refuse a directory with data."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir():
            raise NotADirectoryError(f"{out} is a file")
        existing = list(out.rglob("*.parquet"))
        if existing:
            raise DataError(f"{out}: already holds {len(existing)} Parquet file(s) (e.g. {existing[0].name}); "
                            f"pass an empty or new --out directory")
        return tempfile.mkdtemp(prefix=".criteo-tmp-", dir=out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the output here ({e.strerror or e}); choose a writable --out "
                        f"directory") from None


def _check_args(workers: int, **positive: int | None) -> None:
    if workers < 0:
        raise DataError(f"--workers must be 0 (all cores) or positive, got {workers}")
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {value}")


# --------------------------------------------------------------------------- driver


def convert_criteo(src: str | Path, out: str | Path, *, workers: int = 0, row_group_rows: int = 65536,
                   rows_per_file: int = 4_000_000, show_bad_lines: int = 5, progress: bool = False,
                   has_label: bool = True, chunk_bytes: int | None = None) -> dict:
    """Convert Criteo TSV (a file or a directory) to ``out/part-NNNNN.parquet``; return a report.

    `workers=0` uses every core. `chunk_bytes` overrides the byte-range size of uncompressed
    files (tests use it to split tiny files). The report (see `format_criteo_report`):
    ``{"files": [{"path", "lines", "rows", "malformed", "bad_lines": [{"line", "reason"}]}],
    "rows", "malformed", "seconds", "rows_per_s", "workers", "out", "output_files", "warnings"}``.
    """
    _check_args(workers=workers, row_group_rows=row_group_rows, rows_per_file=rows_per_file,
                chunk_bytes=chunk_bytes)
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    files, skipped = _input_files(src)
    ranges = _plan(files, chunk_bytes)
    workers = min(workers or os.cpu_count() or 1, len(ranges))
    opt = _Options(has_label, row_group_rows, rows_per_file, max(show_bad_lines, 0), _BLOCK_BYTES)
    tmp_dir = _prepare_out(out)
    try:
        results = _run(ranges, tmp_dir, opt, workers, progress)
        output_files = []
        for res in results:
            for partial in res["files"]:
                final = out / f"part-{len(output_files):05d}.parquet"
                os.replace(partial, final)
                output_files.append(str(final))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    report = _report(files, ranges, results, opt)
    seconds = time.perf_counter() - t0
    report.update(seconds=seconds, rows_per_s=report["rows"] / seconds if seconds > 0 else 0.0,
                  workers=workers, out=str(out), output_files=output_files)
    report["warnings"] = [f"skipped {f}: not train.txt or day_N(.gz); pass it as --src to convert it"
                          for f in skipped] + _warnings(report, has_label)
    return report


def _run(ranges: list[_Range], tmp_dir: str, opt: _Options, workers: int, progress: bool) -> list[dict]:
    """Convert every range (in this process when workers == 1); results in range order."""
    from tqdm import tqdm

    bar = tqdm(total=len(ranges), unit="range", desc="criteo", disable=not progress, file=sys.stderr)
    results: list[dict] = [{}] * len(ranges)
    with bar:
        if workers == 1:
            for i, r in enumerate(ranges):
                results[i] = _convert_range(i, r, tmp_dir, opt)
                bar.update()
            return results
        # spawn, not fork: the parent may hold arrow/torch thread pools that a fork would break
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_convert_range, i, r, tmp_dir, opt): i for i, r in enumerate(ranges)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # a failed range fails the run: stop early
                raise
    return results


def _report(files: list[Path], ranges: list[_Range], results: list[dict], opt: _Options) -> dict:
    """Merge range results per input file, turning range-relative line numbers into file ones."""
    per_file = {str(f): {"path": str(f), "lines": 0, "rows": 0, "malformed": 0, "bad_lines": []} for f in files}
    for r, res in zip(ranges, results):
        entry = per_file[r.path]
        room = opt.show_bad_lines - len(entry["bad_lines"])
        entry["bad_lines"] += [{"line": entry["lines"] + b["line"], "reason": b["reason"]}
                               for b in res["bad_lines"][:room]]
        for key in ("lines", "rows", "malformed"):
            entry[key] += res[key]
    entries = list(per_file.values())
    return {"files": entries, "rows": sum(e["rows"] for e in entries),
            "malformed": sum(e["malformed"] for e in entries)}


def _warnings(report: dict, has_label: bool) -> list[str]:
    out = []
    for e in report["files"]:
        if e["lines"] == 0:
            out.append(f"{e['path']}: empty file")
        elif e["rows"] == 0:
            hint = ""
            if has_label and all(b["reason"] == "expected 40 fields, got 39" for b in e["bad_lines"]):
                hint = " (39 fields: a file without labels, like Kaggle test.txt? convert it with has_label=False)"
            out.append(f"{e['path']}: no good line, all {e['lines']} malformed{hint}")
    if report["rows"] == 0:
        out.append("no rows written")
    return out


def format_criteo_report(report: dict) -> str:
    """A short table: one line per input file, the totals, the first bad lines, the warnings."""
    width = max([len(e["path"]) for e in report["files"]] + [4])
    lines = [f"{'file':<{width}} {'rows':>13} {'malformed':>10}"]
    for e in report["files"]:
        lines.append(f"{e['path']:<{width}} {e['rows']:>13,} {e['malformed']:>10,}")
    lines.append(f"{'total':<{width}} {report['rows']:>13,} {report['malformed']:>10,}")
    lines.append(f"-> {report['out']}: {len(report['output_files'])} Parquet file(s) in {report['seconds']:.1f} s "
                 f"({report['rows_per_s']:,.0f} rows/s, {report['workers']} worker(s))")
    for e in report["files"]:
        if e["bad_lines"]:
            more = e["malformed"] - len(e["bad_lines"])
            lines.append(f"malformed lines in {e['path']}" + (f" (first {len(e['bad_lines'])})" if more else "") + ":")
            lines += [f"  line {b['line']}: {b['reason']}" for b in e["bad_lines"]]
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
