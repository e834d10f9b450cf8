"""Shared fixtures: small synthetic click logs and a runner for real torchrun jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SYNTH_CONFIG = ROOT / "configs" / "dlrm_synth.toml"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, Path]:
    """60k train rows in 3 files and 8k eval rows, Criteo-shaped, written once per session."""
    from data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root / "train", 60_000, seed=0, files=3, row_group_rows=4096)
    write_synthetic(root / "eval", 8_000, seed=1, files=1, row_group_rows=4096)
    return {"train": root / "train", "eval": root / "eval"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_rectrain(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`rectrain ARGS` in one process, or under torchrun with `nproc` workers (gloo on CPU)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "trainer", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def sets(**values) -> list[str]:
    """--set arguments from keyword pairs written as section__key=value."""
    out = []
    for key, value in values.items():
        out += ["--set", f"{key.replace('__', '.')}={json.dumps(value)}"]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MOVIELENS = ROOT.parent / "shared" / "data" / "movielens-latest-small"


@pytest.fixture(scope="session")
def multitask_data(tmp_path_factory) -> dict[str, Path]:
    """60k train rows in 3 files and 8k eval rows of the multi-task synthetic log."""
    from data.synth import write_synthetic

    root = tmp_path_factory.mktemp("multitask")
    write_synthetic(root / "train", 60_000, seed=0, files=3, row_group_rows=4096, schema="multitask")
    write_synthetic(root / "eval", 8_000, seed=1, files=1, row_group_rows=4096, schema="multitask")
    return {"train": root / "train", "eval": root / "eval"}


@pytest.fixture(scope="session")
def movielens_data(tmp_path_factory) -> dict[str, Path]:
    """The real MovieLens ml-latest-small, converted once per session (skipped if absent)."""
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data not found at {MOVIELENS}")
    from data.movielens import convert_movielens

    root = tmp_path_factory.mktemp("movielens")
    convert_movielens(MOVIELENS, root)
    return {"train": root / "train", "eval": root / "eval", "root": root}
