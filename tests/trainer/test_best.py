"""Early stopping and keep-best checkpoints: the tracker, and a real run that stops early,
keeps its best checkpoint past keep_last rotation, and stays stopped when rerun."""

from __future__ import annotations

import json
import math

from data.synth import write_synthetic
from tests.conftest import read_jsonl
from trainer.best import BestTracker
from trainer.cli import main


def test_tracker_higher_is_better_with_patience():
    t = BestTracker("auc", higher_is_better=True, patience=2)
    assert t.update(10, 0.70) and t.state.step == 10
    assert not t.update(20, 0.69) and not t.should_stop
    assert t.update(30, 0.71) and t.state.evals_since_best == 0
    assert not t.update(40, 0.71)  # equal is not better
    assert not t.update(50, float("nan"))  # NaN never is
    assert t.should_stop and t.state.value == 0.71 and t.state.step == 30


def test_tracker_lower_is_better_min_delta_and_state_round_trip():
    t = BestTracker("logloss", higher_is_better=False, patience=0, min_delta=0.01)
    assert t.update(1, 0.50)
    assert not t.update(2, 0.495)  # better by less than min_delta
    assert t.update(3, 0.48)
    assert not t.should_stop  # patience 0 never stops
    u = BestTracker("logloss", higher_is_better=False)
    u.load_state_dict(t.state_dict())
    assert u.state == t.state
    u.load_state_dict({})
    assert u.state.value is None
    # a best saved for another metric is not comparable: start over
    v = BestTracker("auc", higher_is_better=True)
    v.load_state_dict(t.state_dict())
    assert v.state.value is None and v.state.metric == "auc"


def test_run_stops_early_and_keeps_the_best_checkpoint(tmp_path):
    write_synthetic(tmp_path / "train", 2000, seed=0)
    write_synthetic(tmp_path / "eval", 500, seed=1)
    run = tmp_path / "run"
    args = ["train", "--config", "configs/dlrm_debug.toml",
            "--set", f'data.train_path="{tmp_path / "train"}"', "--set", f'data.eval_path="{tmp_path / "eval"}"',
            "--set", f'train.run_dir="{run}"', "--set", "logging.tensorboard=false", "--set", "train.epochs=20",
            "--set", "eval.every_steps=8", "--set", 'eval.best_metric="logloss"', "--set", "eval.patience=2",
            "--set", "checkpoint.keep_best=true", "--set", "checkpoint.keep_last=1",
            "--set", "checkpoint.every_steps=4", "--set", "optimizer.embedding_lr=0.3"]
    assert main(args) == 0
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "eval"]
    steps_per_epoch = math.ceil(2000 / 64)
    last = evals[-1]["step"]
    assert last < 20 * steps_per_epoch  # it stopped early
    best = min(evals, key=lambda r: r["logloss"])
    # patience 2: the run ends two evaluations after the best one
    assert [r["step"] for r in evals][-3] == best["step"]
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    assert record["step"] == best["step"] and record["value"] == best["logloss"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == [f"step_{best['step']:08d}", f"step_{last:08d}"]  # keep_last=1, plus the best

    # Rerunning resumes into a finished (early-stopped) run: no more training, same best.
    assert main(args) == 0
    again = [r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
    assert max(r["step"] for r in again) <= last
