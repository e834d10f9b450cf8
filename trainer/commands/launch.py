"""`rectrain launch`: run a rectrain command on N workers under torchrun, with one-line errors.

    rectrain launch --nproc 2 --max-restarts 3 -- train --config configs/dlrm_synth.toml --set train.epochs=2

It runs `python -m torch.distributed.run ... -m trainer <command>` as a child process and adds:

* A user-facing error (a bad config key, missing data, `train.device=cuda` without a GPU: what
  the CLI's handler turns into `rectrain: error: ...` and exit code 2) is deterministic, so a
  restart would only hit it again. Each worker that hits one writes a one-line JSON record to
  the per-launch error directory named by RECTRAIN_ERROR_DIR; the launcher stops torchrun at
  once (no restarts), prints the first failing rank's message once and exits with code 2.
* Anything else (a crash, a SIGKILL, running out of memory) is left to torchrun's restarts
  (`--max-restarts`). If torchrun finally gives up, one line names the failing rank, its exit
  code and the log file; exit code 1.
* Worker stdout (progress lines, the result line) streams through. Everything torchrun writes to
  stderr (its own logs, worker tracebacks, the ChildFailedError report, progress bars) goes to
  `<launch dir>/torchrun.log` only, together with a copy of stdout.

The launch directory is `--log-dir`, or a fresh temporary directory that is removed unless the
run failed in a way the one line cannot explain. With several nodes, run one launcher per node
(see launch/torchrun_multinode.sh).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from trainer.config import ConfigError

ERROR_DIR_ENV = "RECTRAIN_ERROR_DIR"
# How long torchrun gets to stop its workers after SIGTERM (it waits up to 30 s for them itself).
STOP_GRACE_SECONDS = 45.0
POLL_SECONDS = 0.05


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a command on N workers under torchrun, with one-line errors",
                       description="Run `rectrain COMMAND ...` on N workers under torchrun. A config or data "
                                   "error stops all workers at once and prints one line (exit code 2); other "
                                   "failures are restarted up to --max-restarts times (exit code 1 if they "
                                   "persist).")
    p.add_argument("--nproc", type=int, default=0, help="workers on this node (default: all GPUs, or 2 on CPU)")
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job (default: 1)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restarts of the worker group after a crash (never after a config or data error)")
    p.add_argument("--rdzv", default=None, metavar="HOST:PORT",
                   help="rendezvous endpoint every node can reach (needed with --nnodes > 1; default: a "
                        "local standalone rendezvous)")
    p.add_argument("--rdzv-backend", default="c10d", choices=("c10d", "static"))
    p.add_argument("--rdzv-id", default="rectrain", help="job id shared by the nodes (c10d rendezvous)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (static rendezvous only)")
    p.add_argument("--log-dir", default=None,
                   help="keep torchrun's full output and the error records here (default: a temporary "
                        "directory, kept only when a crash needs its log)")
    p.add_argument("worker_command", nargs="...", metavar="-- COMMAND ...",
                   help="the rectrain command the workers run, e.g. -- train --config CFG --set k=v")


def run(args) -> int:
    return launch(args.worker_command, nproc=args.nproc, nnodes=args.nnodes, max_restarts=args.max_restarts,
                  rdzv=args.rdzv, rdzv_backend=args.rdzv_backend, rdzv_id=args.rdzv_id, node_rank=args.node_rank,
                  log_dir=args.log_dir)


# ---------------------------------------------------------------------------------- worker side


def record_error(exc: BaseException) -> None:
    """Called by the CLI's handler for a user-facing error: under `rectrain launch`, leave a
    one-line JSON record for the launcher. Without the launcher (no RECTRAIN_ERROR_DIR) nothing."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory:
        return
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    record = {"rank": rank, "attempt": attempt, "kind": "deterministic", "type": type(exc).__name__,
              "message": " ".join(str(exc).split()), "time": time.time()}
    path = Path(directory) / f"rank{rank}-attempt{attempt}.json"
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)  # the launcher never reads half a record
    except OSError:
        pass  # the launcher then sees a plain failure; the worker's own stderr line is in the log


def read_errors(directory: Path) -> list[dict]:
    """The error records in `directory`, earliest first."""
    out = []
    for path in Path(directory).glob("rank*-attempt*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: (r.get("time", 0.0), r.get("rank", 0)))


# ---------------------------------------------------------------------------------- launcher side


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 2


def torchrun_command(command: list[str], nproc: int, nnodes: str = "1", max_restarts: int = 0,
                     rdzv: str | None = None, rdzv_backend: str = "c10d", rdzv_id: str = "rectrain",
                     node_rank: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--max_restarts={max_restarts}"]
    if rdzv:
        cmd += [f"--nnodes={nnodes}", f"--rdzv_backend={rdzv_backend}", f"--rdzv_endpoint={rdzv}"]
        cmd += [f"--node_rank={node_rank}"] if rdzv_backend == "static" else [f"--rdzv_id={rdzv_id}"]
    elif nnodes in ("1", "1:1"):
        cmd += ["--standalone"]
    else:
        raise ConfigError(f"rectrain launch: --nnodes {nnodes} needs --rdzv HOST:PORT, an endpoint every node can "
                          f"reach")
    return cmd + ["-m", "trainer", *command]


def _check_command(command: list[str]) -> list[str]:
    """The worker command without a leading `--`; argparse errors (usage, exit code 2) are raised
    here, before any worker starts."""
    from trainer.cli import build_parser

    command = command[1:] if command[:1] == ["--"] else list(command)
    if not command:
        raise ConfigError("rectrain launch: give the command the workers run after `--`, e.g. "
                          "rectrain launch --nproc 2 -- train --config CFG")
    if command[0] in ("launch", "demo"):
        raise ConfigError(f"rectrain launch: cannot run `{command[0]}` under torchrun; use train or eval")
    build_parser().parse_args(command)
    return command


def launch(command: list[str], nproc: int = 0, nnodes: str = "1", max_restarts: int = 0, rdzv: str | None = None,
           rdzv_backend: str = "c10d", rdzv_id: str = "rectrain", node_rank: int = 0,
           log_dir: str | os.PathLike | None = None) -> int:
    """Run `rectrain COMMAND` on `nproc` workers under torchrun; 0 on success, 2 after a
    deterministic (config/data) error, 1 after any other failure. See the module docstring."""
    command = _check_command(command)
    cmd = torchrun_command(command, nproc or default_nproc(), nnodes, max_restarts, rdzv, rdzv_backend, rdzv_id,
                           node_rank)
    directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="rectrain-launch-"))
    errors = directory / "errors"
    errors.mkdir(parents=True, exist_ok=True)
    for stale in errors.glob("rank*-attempt*.json"):  # a reused --log-dir: only this launch's records count
        stale.unlink()
    log_path = directory / "torchrun.log"
    env = dict(os.environ)
    env[ERROR_DIR_ENV] = str(errors.resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines as they come, not when a pipe buffer fills

    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        # Its own session: a Ctrl-C reaches the launcher only, which passes it on once.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        lock = threading.Lock()
        stderr_tail: deque[str] = deque(maxlen=500)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, log, lock, sys.stdout, None), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, log, lock, None, stderr_tail), daemon=True)]
        for t in pumps:
            t.start()
        with _forwarded_signals(proc) as received:
            first = _watch(proc, errors)
            if first is not None:
                _stop(proc)
        for t in pumps:
            t.join(timeout=10)
    if first is None:
        found = read_errors(errors)  # a record written as torchrun was already exiting
        first = found[0] if found else None
    if first is not None or proc.returncode == 0:
        if not log_dir:  # the one line (or the result) says it all
            shutil.rmtree(directory, ignore_errors=True)
    if first is not None:
        print(f"rectrain: error: {first['message']}", file=sys.stderr, flush=True)
        return 2
    if proc.returncode == 0:
        return 0
    if received:
        print(f"rectrain: error: stopped by {signal.Signals(received[0]).name}; torchrun's full output is in "
              f"{log_path}", file=sys.stderr, flush=True)
        return 128 + received[0]
    print(f"rectrain: error: {_failure_summary(stderr_tail, proc.returncode, max_restarts)}; torchrun's full "
          f"output is in {log_path}", file=sys.stderr, flush=True)
    return 1


def _pump(pipe, log, lock: threading.Lock, forward, tail: deque | None) -> None:
    """Copy `pipe` line by line into the log, and to `forward` (a text stream) or `tail`."""
    for raw in iter(pipe.readline, b""):
        with lock:
            log.write(raw)
            log.flush()
        line = raw.decode(errors="replace")
        if forward is not None:
            forward.write(line)
            forward.flush()
        if tail is not None:
            tail.append(line)
    pipe.close()


def _watch(proc: subprocess.Popen, errors: Path) -> dict | None:
    """Wait for torchrun to end or a worker's error record to appear; the earliest record then."""
    while proc.poll() is None:
        found = read_errors(errors)
        if found:
            return found[0]
        time.sleep(POLL_SECONDS)
    return None


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its workers, each in its own session, and restarts nothing);
    SIGKILL it and anything it still has running if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def proc_stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...: field 3 of
    proc(5) is [0]), or None where the process is gone or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields after it are fixed.
    return stat[stat.rindex(")") + 2:].split()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from every process's /proc/<pid>/stat."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := proc_stat_fields(entry)) is not None and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`. torchrun starts each worker in a session of its own, so a
    process-group kill misses them; this walk does not."""
    out, todo = [], [pid]
    while todo:
        found = child_pids(todo.pop())
        out += found
        todo += found
    return out


class _forwarded_signals:
    """While torchrun runs, SIGINT/SIGTERM/SIGHUP sent to the launcher go to torchrun (which stops
    its workers); the signals received are listed in the context value."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.received: list[int] = []
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def __enter__(self) -> list[int]:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self.received

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.proc.wait()
        else:  # the launcher itself failed: do not leave torchrun running
            _stop(self.proc)
        for s, handler in self.previous.items():
            signal.signal(s, handler)


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _failure_summary(stderr_tail, returncode: int, max_restarts: int) -> str:
    """One line from torchrun's ChildFailedError report: the first failing rank and its exit code."""
    match = _ROOT_CAUSE.search("".join(stderr_tail))
    if not match:
        return f"torchrun exited with code {returncode} (--max-restarts {max_restarts})"
    rank, code = int(match.group(1)), int(match.group(2))
    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
    return f"worker rank {rank} {how} and torchrun gave up (--max-restarts {max_restarts})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
