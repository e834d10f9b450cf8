"""Rank-0 reporting: TensorBoard event files, a metrics.jsonl mirror, console lines."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("rectrain")


def setup_console(rank: int) -> None:
    """Rank 0 logs rectrain's INFO to stdout; other ranks only errors. Libraries' own INFO
    chatter (TorchRec prints every TBE's arguments) stays below the threshold."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, force=True)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[rectrain %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    log.propagate = False
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class RunLogger:
    """Writes only on rank 0; a no-op elsewhere, so callers need no rank checks."""

    def __init__(self, log_dir: Path, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.log_dir = log_dir
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.path, "a")
        if tensorboard:
            self.writer = self._open_writer()

    def _open_writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a resumed run logs those steps again): rewrite
        metrics.jsonl without them and tell TensorBoard to purge them (`purge_step`)."""
        if not self.enabled:
            return
        self.jsonl.close()
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None
                and _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(self.path, "a")
        if self.writer is not None:
            self.writer.close()
            self.writer = self._open_writer(purge_step=step + 1)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), "prefix": prefix, **values}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, body: str) -> None:
        if self.enabled and self.writer is not None:
            # TensorBoard renders text as markdown; indent so tables stay monospaced.
            self.writer.add_text(tag, "\n".join("    " + line for line in body.splitlines()), 0)

    def embedding(self, tag: str, vectors, labels: list[str], step: int) -> None:
        """Vectors for TensorBoard's projector, labelled (e.g. item titles)."""
        if self.enabled and self.writer is not None and len(labels):
            self.writer.add_embedding(vectors, metadata=labels, tag=tag, global_step=step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.enabled and self.writer is not None:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank or torn one (a crash mid-write)."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except (ValueError, AttributeError):
        return None
