"""A changed config is never silent: resuming with other hyper-parameters is refused with a
one-line diff (unless the keys may change or checkpoint.resume=force), a fresh run never mixes
with an old run's checkpoints, and eval refuses a checkpoint trained with another config."""

from __future__ import annotations

import json

import pytest

from data.synth import write_synthetic
from tests.conftest import read_jsonl
from trainer.cli import main


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_changes")
    write_synthetic(root / "train", 800, seed=0)
    write_synthetic(root / "eval", 300, seed=1)
    return root


def _args(logs, run, *extra):
    sets = [f'data.train_path="{logs / "train"}"', f'data.eval_path="{logs / "eval"}"', f'train.run_dir="{run}"',
            "logging.tensorboard=false", "logging.progress_bar=false", "train.max_steps=6", *extra]
    return ["--config", "configs/dlrm_debug.toml", *(a for s in sets for a in ("--set", s))]


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_resume_with_changed_hyperparameters_is_refused_with_a_diff(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(logs, run)]) == 0
    capsys.readouterr()
    assert main(["train", *_args(logs, run, "optimizer.dense_lr=0.5", "model.arch.dropout=0.1")]) == 2
    err = _stderr_line(capsys)
    assert "optimizer.dense_lr: 0.003 -> 0.5" in err and "model.arch.dropout: 0.0 -> 0.1" in err
    assert "checkpoint.resume=force" in err
    # keys that may change on resume: more steps, evaluation, logging
    assert main(["train", *_args(logs, run, "train.max_steps=8", "eval.max_batches=1", "train.log_every=1")]) == 0
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
    assert max(steps) == 8
    # force takes the changed config
    assert main(["train", *_args(logs, run, "train.max_steps=10", "optimizer.dense_lr=0.5",
                                 "checkpoint.resume=force")]) == 0
    assert (run / "checkpoints" / "step_00000010").is_dir()


def test_fresh_run_refuses_an_old_runs_checkpoints(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(logs, run)]) == 0
    capsys.readouterr()
    assert main(["train", *_args(logs, run, 'checkpoint.resume="never"')]) == 2
    err = _stderr_line(capsys)
    assert "'checkpoint.resume'" in err and "step_00000006" in err and "train.run_dir" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000006"]


def test_rerunning_a_finished_run_does_nothing(logs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_args(logs, run)]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    rows = len(read_jsonl(run / "metrics.jsonl"))
    assert main(["train", *_args(logs, run)]) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(again)["auc"] == json.loads(first)["auc"]
    assert len(read_jsonl(run / "metrics.jsonl")) == rows  # no second evaluation, no new rows


@pytest.mark.parametrize("change, keys", [
    ('data.id_policy="hash"', ["data.id_policy: 'modulo' -> 'hash'"]),
    ('data.dense_transform="none"', ["data.dense_transform: 'log1p' -> 'none'"]),
    ("model.embedding_dim=4", ["model.embedding_dim: 8 -> 4"]),
])
def test_eval_refuses_a_checkpoint_trained_with_another_config(logs, tmp_path, capsys, change, keys):
    run = tmp_path / "run"
    assert main(["train", *_args(logs, run)]) == 0
    capsys.readouterr()
    code = main(["eval", *_args(logs, run, change), "--checkpoint", str(run / "checkpoints")])
    assert code == 2
    err = _stderr_line(capsys)
    assert "trained with another config" in err
    for key in keys:
        assert key in err
