#!/usr/bin/env python
"""Provoke each fault and bad input of README's "What happens when" against the real command
line and print one markdown row per probe: exit code, stderr, the one-line message, a verdict.

    .venv/bin/python scripts/reliability_probes.py [--out DIR] [--timeout SECONDS]

Every probe is a subprocess, `python -m trainer ...` (`python -m trainer launch --nproc 2
--max-restarts 2 -- train ...` for the multi-process ones), on a tiny synthetic click log
(2,000 rows in 2 Parquet files) and the debug DLRM (configs/dlrm_debug.toml) with a few steps.
The inputs, run directories and this report (report.md) stay under --out for a look afterwards.

Verdicts, the first that applies:

  HANG          the command ran past --timeout and was killed
  traceback     stderr contains "Traceback" or has more than one line
  SILENT-WRONG  exit 0 where an error was due, or exit 0 with a wrong outcome / a policy not counted
  UNEXPECTED    an error was due but it is not exit 2 with a `rectrain: error:` line, or a success
                was due and the command failed
  UNCLEAR       the one-line error misses what it should name (the file, the row, the key...)
  clear error / counted policy / correct   what the README promises
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.commands.launch import descendants  # noqa: E402

CONFIG = ROOT / "configs" / "dlrm_debug.toml"
ROWS = 2000  # 2 files of 1,000 rows, row groups of 500
EVAL_ROWS = 300
ROW_GROUP = 500
MESSAGE_CHARS = 160

# What the process environment of a probe must not inherit (a probe is never a torchrun worker).
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "RECTRAIN_ERROR_DIR")


# ------------------------------------------------------------------------------ running commands


@dataclass
class Run:
    """One command and what came of it."""

    argv: list[str]
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    hung: bool = False

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def error_line(self) -> str:
        """The `rectrain: error: ...` line on stderr ('' if none)."""
        return next((line for line in self.stderr_lines if line.startswith("rectrain: error:")), "")

    def result(self) -> dict:
        """The result JSON a finished train/eval prints as its last stdout line ({} if none)."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    return {}
        return {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in DIST_ENV:
        env.pop(key, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the command (the launcher passes it on to torchrun, which stops its workers); then
    SIGKILL whatever of the processes it started is still there. torchrun starts workers in
    sessions of their own, so the tree is walked through /proc rather than killed by group."""
    started = set(descendants(proc.pid))
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass
    still = set(descendants(proc.pid)) if proc.poll() is None else set()
    for pid in sorted(started | still):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone already
        if b"python" in cmdline or b"trainer" in cmdline or b"torch" in cmdline:  # never a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass


def rectrain(argv: list[str], timeout: float) -> Run:
    """`python -m trainer ARGV` from the repository root; killed (and marked hung) after `timeout`."""
    run = Run(argv=list(argv))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        run.stdout, run.stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.hung = True
        _stop_tree(proc)
        run.stdout, run.stderr = proc.communicate()
    run.rc = proc.returncode
    run.seconds = time.monotonic() - started
    return run


# ------------------------------------------------------------------------------ verdicts


Check = Callable[[Run], "str | None"]  # a problem, or None when the check holds


@dataclass
class Probe:
    key: str  # "19a"
    title: str
    expect: str  # "error", "policy" or "correct"
    run: Run
    problems: list[str] = field(default_factory=list)
    evidence: str = ""  # what shows a success worked (for the message column)

    @property
    def sort_key(self) -> tuple[int, str]:
        digits = "".join(c for c in self.key if c.isdigit())
        return int(digits), self.key[len(digits):]

    def verdict(self) -> str:
        r = self.run
        if r.hung:
            return "HANG"
        if "Traceback" in r.stderr or len(r.stderr_lines) > 1:
            return "traceback"
        if self.expect == "error":
            if r.rc == 0:
                return "SILENT-WRONG (exit 0)"
            if r.rc != 2 or not r.error_line:
                return f"UNEXPECTED (exit {r.rc}, no `rectrain: error:` line)" if not r.error_line else \
                    f"UNEXPECTED (exit {r.rc})"
            if self.problems:
                return "UNCLEAR: " + "; ".join(self.problems)
            return "clear error"
        if r.rc != 0:
            return f"UNEXPECTED (exit {r.rc})" + (": " + "; ".join(self.problems) if self.problems else "")
        if self.problems:
            return "SILENT-WRONG: " + "; ".join(self.problems)
        return "counted policy" if self.expect == "policy" else "correct"

    def message(self) -> str:
        r = self.run
        lines = r.stderr_lines
        if r.hung:
            text = "killed after the timeout" + (f"; last stderr line: {lines[-1]}" if lines else "")
        elif "Traceback" in r.stderr and lines:
            text = f"(last line) {lines[-1]}"
        elif lines:
            text = r.error_line or lines[0]
        else:
            text = f"stdout: {self.evidence}" if self.evidence else "(stderr empty)"
        text = " ".join(text.split())
        return text[:MESSAGE_CHARS]


def has(*needles: str) -> Check:
    """The error line names each of `needles`."""

    def check(run: Run) -> str | None:
        missing = [n for n in needles if n not in run.error_line]
        return f"does not name {', '.join(repr(n) for n in missing)}" if missing else None

    return check


class Report:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.probes: list[Probe] = []
        self.setups: list[tuple[str, Run, str]] = []

    def probe(self, key: str, title: str, expect: str, argv: list[str], checks: tuple[Check, ...] = (),
              evidence: Callable[[Run], str] | None = None) -> Probe:
        print(f"  probe {key:>4} {title} ...", end=" ", file=sys.stderr, flush=True)
        run = rectrain(argv, self.timeout)
        probe = Probe(key, title, expect, run)
        if not run.hung:
            for check in checks:
                try:
                    problem = check(run)
                except Exception as e:  # a check that cannot even look is a finding, not a crash here
                    problem = f"check failed: {type(e).__name__}: {e}"
                if problem:
                    probe.problems.append(problem)
            if evidence is not None and run.rc == 0:
                try:
                    probe.evidence = evidence(run)
                except Exception as e:
                    probe.evidence = f"({type(e).__name__}: {e})"
        self.probes.append(probe)
        print(f"exit {run.rc} in {run.seconds:.1f} s: {probe.verdict()}", file=sys.stderr, flush=True)
        return probe

    def setup(self, name: str, argv: list[str], ok: Check | None = None) -> Run:
        """A run a probe builds on (a finished run to resume, a stopped one); not a row itself."""
        print(f"  setup {name} ...", end=" ", file=sys.stderr, flush=True)
        run = rectrain(argv, self.timeout)
        problem = "hung" if run.hung else (f"exit {run.rc}" if run.rc != 0 else (ok(run) if ok else None))
        self.setups.append((name, run, problem or ""))
        print(f"exit {run.rc} in {run.seconds:.1f} s" + (f" PROBLEM: {problem}" if problem else ""), file=sys.stderr,
              flush=True)
        return run

    def table(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        rows = ["| probe | exit code | stderr lines | traceback? | message (first 160 chars) | verdict |",
                "|---|---|---|---|---|---|"]
        for p in sorted(self.probes, key=lambda p: p.sort_key):
            r = p.run
            rows.append(f"| {cell(p.key + ' ' + p.title)} | {'-' if r.rc is None else r.rc} | {len(r.stderr_lines)} "
                        f"| {'yes' if 'Traceback' in r.stderr else 'no'} | {cell(p.message())} | {cell(p.verdict())} |")
        return "\n".join(rows)

    def details(self) -> str:
        """The full stderr (tail) of every probe that is not what the README promises."""
        good = ("clear error", "counted policy", "correct")
        out = []
        for p in sorted(self.probes, key=lambda p: p.sort_key):
            if p.verdict() in good:
                continue
            r = p.run
            out.append(f"### {p.key} {p.title}: {p.verdict()}\n\ncommand: python -m trainer {' '.join(r.argv)}\n"
                       f"exit {r.rc} after {r.seconds:.1f} s\n\nstderr (last 3000 chars):\n```\n{r.stderr[-3000:]}\n```\n"
                       f"stdout (last 1500 chars):\n```\n{r.stdout[-1500:]}\n```")
        for name, r, problem in self.setups:
            if problem:
                out.append(f"### setup {name}: {problem}\n\ncommand: python -m trainer {' '.join(r.argv)}\n"
                           f"stderr (last 3000 chars):\n```\n{r.stderr[-3000:]}\n```\nstdout (last 1500 chars):\n"
                           f"```\n{r.stdout[-1500:]}\n```")
        return "\n\n".join(out)


# ------------------------------------------------------------------------------ data


def q(value) -> str:
    """A TOML string literal for --set."""
    return json.dumps(str(value))


def sets(overrides: dict[str, str]) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={value}"]
    return out


def train_args(train, eval_path, run_dir, overrides: dict[str, str] | None = None, command: str = "train") -> list[str]:
    """`train` (or `eval`) on the debug DLRM: given data and run directory, no TensorBoard, no bar."""
    values = {"data.train_path": q(train), "data.eval_path": q(eval_path), "train.run_dir": q(run_dir),
              "logging.tensorboard": "false", "logging.progress_bar": "false"}
    values.update(overrides or {})
    return [command, "--config", str(CONFIG), *sets(values)]


def replaced(table, column: str, values, typ=None):
    import pyarrow as pa

    typ = typ or table.schema.field(column).type
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, typ))


def write_files(directory: Path, tables: list, options: list[dict] | None = None) -> list[Path]:
    """One part-0000k.parquet per table, with page checksums (as rectrain's converters write)."""
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, table in enumerate(tables):
        kw = dict(row_group_size=ROW_GROUP, write_page_checksum=True)
        kw.update((options or [{}] * len(tables))[k])
        path = directory / f"part-{k:05d}.parquet"
        pq.write_table(table, path, **kw)
        paths.append(path)
    return paths


def halves(table) -> list:
    half = table.num_rows // 2
    return [table.slice(0, half), table.slice(half)]


def corrupt_page(path: Path, row_group: int, column: str) -> None:
    """Overwrite 8 bytes in the middle of one column chunk's data (as tests/reliability do)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    index = next(i for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    chunk = meta.column(index)
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------------------ the probes


def run_probes(out: Path, report: Report) -> None:
    import numpy as np
    import pyarrow as pa

    from data.synth import synthesize_table

    base = synthesize_table(ROWS, seed=0)
    first, second = halves(base)
    good = out / "data" / "good"
    write_files(good / "train", [first, second])
    write_files(good / "eval", [synthesize_table(EVAL_ROWS, seed=1)])
    good_train, good_eval = good / "train", good / "eval"
    bad_file = "part-00001.parquet"

    def probe_dir(key: str) -> Path:
        d = out / "probes" / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def data_probe(key, title, tables, options=None, overrides=None, checks=(), expect="error", evidence=None,
                   mutate=None):
        d = probe_dir(key)
        write_files(d / "train", tables, options)
        if mutate is not None:
            mutate(d / "train")
        return report.probe(key, title, expect, train_args(d / "train", good_eval, d / "run", overrides),
                            checks, evidence)

    def bad_path(key: str) -> str:
        return str(out / "probes" / key / "train" / bad_file)

    # 1-5: files refused at startup, or (a corrupt page) when read
    data_probe("1", "zero-byte file", [first, second],
               mutate=lambda d: (d / bad_file).write_bytes(b""), checks=(has(bad_path("1")),))
    data_probe("2", "truncated file", [first, second],
               mutate=lambda d: (d / bad_file).write_bytes((d / bad_file).read_bytes()[:(d / bad_file).stat().st_size // 2]),
               checks=(has(bad_path("2")),))
    data_probe("3", "not Parquet (CSV named .parquet)", [first, second],
               mutate=lambda d: (d / bad_file).write_text("label,dense_0,cat_0\n1,2.0,3\n0,1.0,5\n"),
               checks=(has(bad_path("3")),))
    data_probe("4", "schemas differ (cat_1 int32 in file 2)",
               [first, replaced(second, "cat_1", second.column("cat_1").to_numpy().astype(np.int32), pa.int32())],
               checks=(has(bad_path("4"), "cat_1"),))
    data_probe("5", "corrupt data page (checksums)", [first, second],
               options=[{}, dict(compression="none", use_dictionary=False)],
               mutate=lambda d: corrupt_page(d / bad_file, 1, "dense_1"),
               checks=(has(bad_path("5"), "row group 1", "dense_1"),))

    # 6-8: binary labels outside {0, 1}, row 123 of the second file
    labels = second.column("label").to_pylist()
    data_probe("6", "binary label 2", [first, replaced(second, "label", labels[:123] + [2] + labels[124:])],
               checks=(has(bad_path("6"), "label", "row 123", "label 2 "),))
    as_float = [replaced(t, "label", [float(v) for v in t.column("label").to_pylist()], pa.float64())
                for t in (first, second)]
    data_probe("7", "binary label 0.5",
               [as_float[0], replaced(as_float[1], "label", [float(v) for v in labels[:123]] + [0.5]
                                      + [float(v) for v in labels[124:]])],
               checks=(has(bad_path("7"), "label", "row 123", "label 0.5 "),))
    data_probe("8", "binary label -1", [first, replaced(second, "label", labels[:123] + [-1] + labels[124:])],
               checks=(has(bad_path("8"), "label", "row 123", "label -1 "),))

    # 9-10: NaN in a dense column, row 200 of the second file (nulls stay nulls)
    dense = second.column("dense_1").to_pylist()
    dense[200] = math.nan
    nan_tables = [first, replaced(second, "dense_1", dense, pa.float32())]
    data_probe("9", "NaN dense value (data.non_finite=error)", nan_tables,
               checks=(has(bad_path("9"), "dense_1", "row 200"),))

    def counted(name: str, want_samples: int | None = None) -> Check:
        def check(run: Run) -> str | None:
            if f"{name}=" not in run.stdout:
                return f"no {name} on the console"
            got = run.result().get("samples_trained")
            if want_samples is not None and got != want_samples:
                return f"samples_trained {got}, expected {want_samples}"
            return None

        return check

    def counter_evidence(name: str) -> Callable[[Run], str]:
        def evidence(run: Run) -> str:
            totals = 0
            for line in run.stdout.splitlines():
                for word in line.split():
                    if word.startswith(f"{name}="):
                        digits = "".join(c for c in word.split("=", 1)[1] if c.isdigit())
                        totals += int(digits or 0)
            result = run.result()
            return (f"{name} summed over console lines = {totals}; samples_trained={result.get('samples_trained')} "
                    f"step={result.get('step')}")

        return evidence

    data_probe("10", "NaN dense value, data.non_finite=drop_row", nan_tables,
               overrides={"data.non_finite": q("drop_row")}, expect="policy",
               checks=(counted("dropped_rows", ROWS - 1),), evidence=counter_evidence("dropped_rows"))

    # 11: no rows at all
    data_probe("11", "dataset with no rows", [first.slice(0, 0), second.slice(0, 0)],
               checks=(has(str(out / "probes" / "11" / "train"), "no rows"),))

    # 12-15: config errors before anything runs
    d = probe_dir("12")
    report.probe("12", "sparse column without a table", "error",
                 train_args(good_train, good_eval, d / "run",
                            {"data.sparse_columns": '["cat_0", "cat_1", "cat_5", "cat_23", "cat_2"]'}),
                 checks=(has("cat_2"),))
    tables = ('{name = "t_cat_0", features = ["cat_0"], num_embeddings = 1460}, '
              '{name = "t_cat_1", features = ["cat_1"], num_embeddings = 583}, '
              '{name = "t_cat_5", features = ["cat_5"], num_embeddings = 24}, '
              '{name = "t_cat_23", features = ["cat_23"], num_embeddings = 2860}')
    d = probe_dir("13a")
    report.probe("13a", "table feature cat_2 not in data.sparse_columns", "error",
                 train_args(good_train, good_eval, d / "run", {
                     "model.tables": f'[{tables}, {{name = "t_cat_2", features = ["cat_2"], num_embeddings = 10000}}]'}),
                 checks=(has("cat_2"),))
    d = probe_dir("13b")
    report.probe("13b", "table feature that is no column at all", "error",
                 train_args(good_train, good_eval, d / "run", {
                     "model.tables": f'[{tables}, {{name = "t_x", features = ["no_such_col"], num_embeddings = 10}}]'}),
                 checks=(has("no_such_col"),))
    d = probe_dir("14")
    report.probe("14", 'model.name="nope"', "error",
                 train_args(good_train, good_eval, d / "run", {"model.name": q("nope")}), checks=(has("nope"),))
    d = probe_dir("15")
    report.probe("15", 'train.device="cuda" without a GPU', "error",
                 train_args(good_train, good_eval, d / "run", {"train.device": q("cuda")}),
                 checks=(has("train.device"),))

    # 16: data synth --rows 0
    d = probe_dir("16")

    def nothing_written(run: Run) -> str | None:
        return "wrote files anyway" if list((d / "synth").glob("*.parquet")) else None

    report.probe("16", "data synth --rows 0", "error", ["data", "synth", "--out", str(d / "synth"), "--rows", "0"],
                 checks=(has("--rows"), nothing_written))

    # 17: strict ids, a bad id in the SECOND file, no statistics, shuffled, read in DataLoader workers
    ids = second.column("cat_0").to_pylist()
    ids[321] = 5000  # t_cat_0 has 1,460 rows
    data_probe("17", "strict: out-of-range id in the 2nd file", [first, replaced(second, "cat_0", ids)],
               options=[{}, dict(write_statistics=False)],
               overrides={"data.id_policy": q("strict"), "data.num_workers": "2"},
               checks=(has(bad_path("17"), "cat_0", "row 321", "5000"),))

    # 18: uint64 ids >= 2^63 under strict
    big = 2**63 + 5
    as_u64 = [replaced(t, "cat_0", t.column("cat_0").to_numpy().astype(np.uint64), pa.uint64()) for t in (first, second)]
    u64 = as_u64[1].column("cat_0").to_pylist()
    u64[77] = big
    data_probe("18", "strict: uint64 id >= 2^63", [as_u64[0], replaced(as_u64[1], "cat_0", u64, pa.uint64())],
               overrides={"data.id_policy": q("strict")},
               checks=(has(bad_path("18"), "cat_0", "row 77", str(big)),))

    # 19: lists longer than data.max_list_length (cat_23 holds 1-5 ids a row)
    d = probe_dir("19a")
    report.probe("19a", "list > data.max_list_length=3 (truncate)", "policy",
                 train_args(good_train, good_eval, d / "run", {"data.max_list_length": "3"}),
                 checks=(counted("truncated_ids"),), evidence=counter_evidence("truncated_ids"))
    d = probe_dir("19b")
    report.probe("19b", "list > data.max_list_length=3 (list_overflow=error)", "error",
                 train_args(good_train, good_eval, d / "run",
                            {"data.max_list_length": "3", "data.list_overflow": q("error")}),
                 checks=(has("cat_23", "max_list_length", "part-0000"),))

    # 20: a regression label whose square overflows float32 (rows 300-303: the 5th batch of 64)
    d = probe_dir("20")
    big_label = np.ones(ROWS, dtype=np.float32)
    big_label[300:304] = 1e30
    write_files(d / "train", [base.append_column("big", pa.array(big_label))])
    eval_table = synthesize_table(EVAL_ROWS, seed=1)
    write_files(d / "eval", [eval_table.append_column("big", pa.array(np.ones(EVAL_ROWS, dtype=np.float32)))])
    loss_sets = {"data.label_columns": '["label", "big"]',
                 "model.tasks": '[{name = "label"}, {name = "big", kind = "regression", serving_weight = 0.0}]',
                 "data.shuffle_buffer_rows": "0", "checkpoint.every_steps": "2", "train.log_every": "1"}
    run_a = d / "run_error"

    def last_checkpoint_intact(run: Run) -> str | None:
        found = checkpoints(run_a)
        if found != ["step_00000002", "step_00000004"]:
            return f"checkpoints {found}, expected step_2 and step_4"
        if not (run_a / "checkpoints" / "step_00000004" / ".metadata").is_file():
            return "step_00000004 has no .metadata"
        # intact means loadable: evaluate it
        ev = rectrain(train_args(d / "train", d / "eval", run_a, loss_sets, command="eval")
                      + ["--checkpoint", str(run_a / "checkpoints" / "step_00000004")], report.timeout)
        logloss = ev.result().get("logloss")
        if ev.rc != 0 or logloss is None or not math.isfinite(logloss):
            return f"eval of step_00000004: exit {ev.rc}, logloss {logloss}: {' '.join(ev.stderr_lines[-1:])[:200]}"
        return None

    report.probe("20a", "loss Inf (non_finite_loss=error)", "error",
                 train_args(d / "train", d / "eval", run_a, loss_sets),
                 checks=(has("step 5", "step_00000004"), last_checkpoint_intact))

    def one_skip(run: Run) -> str | None:
        result = run.result()
        if result.get("skipped_steps") != 1:
            return f"skipped_steps {result.get('skipped_steps')}, expected 1"
        return None

    report.probe("20b", "loss Inf (non_finite_loss=skip)", "policy",
                 train_args(d / "train", d / "eval", d / "run_skip",
                            {**loss_sets, "train.non_finite_loss": q("skip"), "train.max_steps": "8"}),
                 checks=(one_skip,),
                 evidence=lambda r: f"skipped_steps={r.result().get('skipped_steps')} step={r.result().get('step')} "
                                    f"samples_trained={r.result().get('samples_trained')}")

    # 21: checkpoint.dir below a regular file (root writes anywhere; a file in the path stops it)
    d = probe_dir("21")
    (d / "a_file").write_text("not a directory\n")
    report.probe("21", "unwritable checkpoint dir (below a file)", "error",
                 train_args(good_train, good_eval, d / "run", {"checkpoint.dir": q(d / "a_file" / "ckpt")}),
                 checks=(has(str(d / "a_file" / "ckpt")),))

    # 22-24, 26: one finished run of 4 steps, then reruns against it (the one that changes it last)
    d = probe_dir("22-26")
    run_dir = d / "run"
    finished = {"train.max_steps": "4"}
    report.setup("a finished 4-step run (for 22-24, 26)", train_args(good_train, good_eval, run_dir, finished),
                 ok=lambda r: None if checkpoints(run_dir) == ["step_00000004"] else f"checkpoints {checkpoints(run_dir)}")
    metrics_before = (run_dir / "metrics.jsonl").read_bytes() if (run_dir / "metrics.jsonl").is_file() else b""
    ckpts_before = checkpoints(run_dir)

    def untouched(run: Run) -> str | None:
        now = (run_dir / "metrics.jsonl").read_bytes() if (run_dir / "metrics.jsonl").is_file() else b""
        if now != metrics_before:
            added = len(now.splitlines()) - len(metrics_before.splitlines())
            return f"metrics.jsonl changed ({added:+d} lines)"
        if checkpoints(run_dir) != ckpts_before:
            return f"checkpoints changed: {ckpts_before} -> {checkpoints(run_dir)}"
        return None

    report.probe("26", "rerun of a finished run", "correct", train_args(good_train, good_eval, run_dir, finished),
                 checks=(untouched,),
                 evidence=lambda r: f"metrics.jsonl unchanged ({len(metrics_before.splitlines())} lines); "
                                    f"result step={r.result().get('step')} auc={r.result().get('auc')}")
    report.probe("23", 'checkpoint.resume="never" into a dir with checkpoints', "error",
                 train_args(good_train, good_eval, run_dir, {**finished, "checkpoint.resume": q("never")}),
                 checks=(has("step_00000004"), untouched))
    report.probe("24", "eval with another data.id_policy", "error",
                 train_args(good_train, good_eval, run_dir, {**finished, "data.id_policy": q("hash")}, command="eval")
                 + ["--checkpoint", str(run_dir / "checkpoints")],
                 checks=(has("data.id_policy"),))
    report.probe("22a", "resume with changed optimizer.dense_lr", "error",
                 train_args(good_train, good_eval, run_dir, {**finished, "optimizer.dense_lr": "0.5"}),
                 checks=(has("optimizer.dense_lr", "0.5"), untouched))

    def forced(run: Run) -> str | None:
        if "resumed from" not in run.stdout:
            return "no 'resumed from' on the console (started afresh?)"
        if run.result().get("step") != 6:
            return f"ended at step {run.result().get('step')}, expected 6"
        return None

    report.probe("22b", "same with checkpoint.resume=force", "correct",
                 train_args(good_train, good_eval, run_dir, {"train.max_steps": "6", "optimizer.dense_lr": "0.5",
                                                             "checkpoint.resume": q("force")}),
                 checks=(forced,),
                 evidence=lambda r: next((ln.split("] ", 1)[-1] for ln in r.stdout.splitlines() if "resumed from" in ln),
                                         "") + f"; step={r.result().get('step')}")

    # 25: a config error under the launcher: one line, exit 2, no restart
    d = probe_dir("25")
    log_dir = d / "launch"

    def not_retried(run: Run) -> str | None:
        records = [json.loads(p.read_text()) for p in sorted((log_dir / "errors").glob("*.json"))]
        if not records:
            return "no error record (did the workers report it?)"
        attempts = sorted({r.get("attempt") for r in records})
        return None if attempts == [0] else f"retried: records of attempts {attempts}"

    report.probe("25", "config error under launch --nproc 2 --max-restarts 2", "error",
                 ["launch", "--nproc", "2", "--max-restarts", "2", "--log-dir", str(log_dir), "--",
                  *train_args(good_train, good_eval, d / "run", {"train.epochs": "0"})],
                 checks=(has("train.epochs"), not_retried))

    # 27: stop a 2-rank run (launcher) at step 10, resume it on 1 rank
    d = probe_dir("27")
    ws = {"data.batch_size": "32", "checkpoint.every_steps": "0", "eval.at_end": "false", "train.log_every": "2"}
    report.setup("2-rank run stopped at step 10 (for 27)",
                 ["launch", "--nproc", "2", "--max-restarts", "2", "--",
                  *train_args(good_train, "", d / "run", {**ws, "train.stop_at_step": "10"})],
                 ok=lambda r: None if checkpoints(d / "run") else "no checkpoint written")

    def every_row_once(run: Run) -> str | None:
        got = run.result().get("samples_trained")
        if "resumed from" not in run.stdout:
            return "no 'resumed from' on the console (started afresh?)"
        return None if got == ROWS else f"samples_trained {got}, expected {ROWS}"

    report.probe("27", "resume 2 -> 1 ranks", "correct", train_args(good_train, "", d / "run", ws),
                 checks=(every_row_once,),
                 evidence=lambda r: f"samples_trained={r.result().get('samples_trained')} (dataset {ROWS} rows) "
                                    f"step={r.result().get('step')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="work directory (default: a fresh temporary directory, kept)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a command may run before it is a HANG")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rectrain-probes-"))
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    started = time.monotonic()
    print(f"reliability probes in {out} (timeout {args.timeout:.0f} s a command)", file=sys.stderr, flush=True)
    report = Report(args.timeout)
    try:
        run_probes(out, report)
    finally:
        total = time.monotonic() - started
        text = report.table()
        details = report.details()
        summary = f"{len(report.probes)} probes in {total:.0f} s; work directory {out}"
        (out / "report.md").write_text(f"{text}\n\n{summary}\n\n{details}\n")
        print(text)
        print(f"\n{summary}")
        if details:
            print(f"\n## Details of the probes that are not as promised\n\n{details}")
    good = ("clear error", "counted policy", "correct")
    return 0 if all(p.verdict() in good for p in report.probes) and not any(s[2] for s in report.setups) else 1


if __name__ == "__main__":
    sys.exit(main())
