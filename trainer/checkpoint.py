"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``<dir>/step_00000123/`` (complete) — written first as ``step_00000123.partial/`` and
renamed by rank 0 only after every rank finished and DCP wrote its ``.metadata``. A crash
mid-save leaves a ``.partial`` directory that is never picked as "latest" and is cleaned up on
the next start. DCP stores sharded tensors by global offsets, so a checkpoint loads at any
world size and sharding plan.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger("rectrain")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def complete_checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def clean_partial(self) -> None:
        """Remove leftovers of interrupted saves (rank 0, before anyone saves)."""
        if dist.get_rank() == 0 and self.directory.is_dir():
            for p in self.directory.glob("*.partial"):
                log.warning("removing incomplete checkpoint %s (an earlier save was interrupted)", p)
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, state: dict, keep: Path | None = None) -> Path:
        """Write `state` as step_<step>; rotation keeps the last `keep_last` and `keep` (the
        best checkpoint, if any)."""
        final = self.directory / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for old in self.complete_checkpoints()[: -self.keep_last]:
                if keep is None or old.name != keep.name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    @staticmethod
    def load(path: str | Path, state: dict) -> dict:
        """Fill `state` in place from the checkpoint (only the keys `state` has)."""
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no DCP .metadata); pass a "
                                    f"step_<N> directory or the checkpoints directory")
        dcp.load(state, checkpoint_id=str(path))
        return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as is, or the latest complete one inside a checkpoints directory."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = Checkpointer(path).latest()
    if latest is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint here (expected step_<N>/ with a .metadata file)")
    return latest
