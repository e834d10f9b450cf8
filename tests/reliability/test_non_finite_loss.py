"""A NaN/Inf loss never reaches the parameters: with train.non_finite_loss=error the run stops at
that step with one line and writes nothing from it; with skip the step's update is dropped,
counted, and the run stops once train.max_skipped_steps is passed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data.synth import synthesize_table
from trainer.cli import main


def _with_overflowing_label(path, rows: int, bad_rows: slice, seed: int) -> None:
    """A click log with a regression label `big` whose square overflows float32 on `bad_rows`."""
    table = synthesize_table(rows, seed)
    big = np.ones(rows, dtype=np.float32)
    big[bad_rows] = 1e30  # finite in float32, but (pred - 1e30)^2 is inf
    path.mkdir(parents=True)
    pq.write_table(table.append_column("big", pa.array(big)), path / "part-0.parquet")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("non_finite")
    _with_overflowing_label(root / "train", 640, slice(300, 304), seed=0)
    _with_overflowing_label(root / "eval", 200, slice(0, 0), seed=1)
    return root


def _args(logs, run, *extra):
    sets = [f'data.train_path="{logs / "train"}"', f'data.eval_path="{logs / "eval"}"', f'train.run_dir="{run}"',
            "logging.tensorboard=false", "logging.progress_bar=false", 'data.label_columns=["label", "big"]',
            'model.tasks=[{name = "label"}, {name = "big", kind = "regression", serving_weight = 0.0}]',
            "data.shuffle_buffer_rows=0", "checkpoint.every_steps=2", "train.log_every=1", *extra]
    return ["train", "--config", "configs/dlrm_debug.toml", *(a for s in sets for a in ("--set", s))]


def test_error_policy_stops_at_the_step_and_keeps_the_last_good_checkpoint(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(logs, run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    # rows 300-303 sit in the 5th batch of 64 (rows 256-319): step 5 fails, step 4 was saved
    assert "step 5:" in err and "NaN or infinite" in err and "'big'" in err and "step_00000004" in err
    assert "train.non_finite_loss=skip" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]


def test_skip_policy_drops_the_update_counts_it_and_ends_finite(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(logs, run, "train.non_finite_loss=\"skip\"")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["skipped_steps"] == 1 and result["step"] == 10
    assert result["samples_trained"] == 640 - 64  # the skipped batch did not train
    out = tmp_path / "final.pt"
    dcp_to_torch_save(str(run / "checkpoints" / "step_00000010"), str(out))
    params = torch.load(out, weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in params.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_skip_policy_gives_up_past_the_limit(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(logs, run, "train.non_finite_loss=\"skip\"", "train.max_skipped_steps=0")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_skipped_steps=0" in err
