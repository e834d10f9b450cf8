"""After a restart, metrics.jsonl and TensorBoard hold one value per step: what was logged after
the checkpoint the run resumes from is dropped and logged again."""

from __future__ import annotations

from collections import Counter

from data.synth import write_synthetic
from tests.conftest import read_jsonl
from trainer.cli import main


def test_resumed_run_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_synthetic(tmp_path / "train", 1000, seed=0)
    run = tmp_path / "run"
    common = ["--config", "configs/dlrm_debug.toml", "--set", f'data.train_path="{tmp_path / "train"}"',
              "--set", 'data.eval_path=""', "--set", f'train.run_dir="{run}"', "--set", "train.log_every=1",
              "--set", "checkpoint.every_steps=4", "--set", "logging.progress_bar=false"]
    # A run that dies after step 6 with its last checkpoint at step 4 (as a crash would leave it).
    assert main(["train", *common, "--set", "train.max_steps=6", "--set", "checkpoint.at_end=false"]) == 0
    first = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"}
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert main(["train", *common, "--set", "train.max_steps=9"]) == 0
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
    counts = Counter(r["step"] for r in rows)
    assert sorted(counts) == list(range(1, 10)) and set(counts.values()) == {1}
    # steps 5 and 6 were trained again from the step-4 checkpoint: the same values come back
    again = {r["step"]: r["loss"] for r in rows}
    assert again[5] == first[5] and again[6] == first[6]
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 10)), steps


def test_rewind_survives_a_line_torn_by_a_crash(tmp_path):
    from trainer.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    logger = RunLogger(tmp_path / "tb", tmp_path, enabled=True, tensorboard=False)
    logger.rewind(1)
    logger.scalars(2, {"loss": 0.3}, "train")
    logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.3)]
