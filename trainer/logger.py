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
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

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

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.enabled and self.writer is not None:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
