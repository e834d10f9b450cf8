"""Resuming at another world size keeps the run's meaning: the global batch, the LR horizon and
the end point stay those of the run's first start, and the epoch goes on with exactly the rows
no rank had read (every row trained once: samples_trained equals the dataset)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SYNTH_CONFIG, read_jsonl, run_rectrain, sets

pytestmark = pytest.mark.multiprocess


def _args(synth_data, run, **extra):
    return ["train", "--config", str(SYNTH_CONFIG),
            *sets(data__train_path=str(synth_data["train"]), data__eval_path="", train__run_dir=str(run),
                  logging__progress_bar=False, logging__tensorboard=False, train__log_every=1,
                  checkpoint__every_steps=0, data__shuffle_buffer_rows=3000, eval__at_end=False, **extra)]


def _train_rows(run):
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"}


@pytest.mark.parametrize("before, after, batch", [(2, 1, 256), (1, 2, 512)])
def test_resume_at_another_world_size_keeps_global_batch_horizon_and_every_row_once(
        synth_data, tmp_path, before, after, batch):
    # The same global batch (512 rows) on either side: 2 ranks x 256 or 1 rank x 512.
    straight = tmp_path / "straight"
    run_rectrain(_args(synth_data, straight, data__batch_size=batch), nproc=before)
    reference = _train_rows(straight)
    steps = max(reference)
    assert steps == 118  # 60k rows / 512 per step, rounded up per reader slot

    moved = tmp_path / "moved"
    run_rectrain(_args(synth_data, moved, data__batch_size=batch, train__stop_at_step=40), nproc=before)
    proc = run_rectrain(_args(synth_data, moved, data__batch_size=batch), nproc=after)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples_trained"] == 60_000  # no row twice, none skipped
    rows = _train_rows(moved)
    assert abs(max(rows) - steps) <= 1  # the end point: the same number of 512-row steps
    # the LR horizon stayed the run's: warmup then cosine to the same floor at the same step
    assert rows[40]["lr_factor"] == reference[40]["lr_factor"]
    assert rows[max(rows)]["lr_factor"] == pytest.approx(reference[steps]["lr_factor"], abs=0.01)
