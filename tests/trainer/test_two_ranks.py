"""Real 2-process jobs: torchrun, gloo, DistributedModelParallel with FBGEMM kernels, DCP."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import SYNTH_CONFIG, read_jsonl, run_rectrain, sets

pytestmark = pytest.mark.multiprocess


def _base(synth_data, run_dir, **extra):
    return sets(
        data__train_path=str(synth_data["train"]),
        data__eval_path=str(synth_data["eval"]),
        train__run_dir=str(run_dir),
        logging__progress_bar=False,
        **extra,
    )


@pytest.fixture(scope="module")
def trained_two_ranks(synth_data, tmp_path_factory):
    """One epoch over 60k rows on 2 ranks with table-wise, column-wise and data-parallel tables."""
    run = tmp_path_factory.mktemp("two_ranks")
    proc = run_rectrain(["train", "--config", str(SYNTH_CONFIG), *_base(synth_data, run, checkpoint__every_steps=0, train__log_every=5)],
                        nproc=2)
    (run / "train_result.json").write_text(proc.stdout.strip().splitlines()[-1])
    return run


def test_two_rank_training_reaches_auc(trained_two_ranks):
    final = json.loads((trained_two_ranks / "eval_final.json").read_text())
    assert final["auc"] >= 0.70
    assert final["num_samples"] == 8_000  # every eval row exactly once across the 2 ranks
    result = json.loads((trained_two_ranks / "train_result.json").read_text())
    assert result["samples_trained"] == 60_000  # every train row exactly once, none dropped
    assert 0.0 < final["ne"] < 1.0
    assert 0.8 < final["calibration"] < 1.25
    train = [r for r in read_jsonl(trained_two_ranks / "metrics.jsonl") if r["prefix"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    # 60k rows, batch 512 per rank: ceil(30000 / 512) = 59 steps.
    assert train[-1]["step"] == 59
    assert all(r["samples_per_sec"] > 0 for r in train)
    ckpt = sorted((trained_two_ranks / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpt] == ["step_00000059"]


def test_plan_mixes_sharding_types_and_tensorboard_has_everything(trained_two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_two_ranks / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/samples_per_sec", "train/lr/embedding", "train/lr/dense",
                "train/lr/data_parallel_tables", "hparam/auc", "eval/auc", "eval/logloss", "eval/ne",
                "eval/calibration", "data/negative_ids", "data/out_of_range_ids", "data/null_ids"):
        assert tag in scalars, tag
    # The synthetic log has ~0.2% null ids in cat_2 and cat_11 and ~1% null dense values.
    nulls = acc.Scalars("data/null_ids")
    assert sum(e.value for e in nulls) > 0
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("sharding_plan")]
    assert text_tags
    plan = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    for kind in ("table_wise", "column_wise", "data_parallel"):
        assert kind in plan
    # The LR follows warmup then cosine decay: it rises over the first 20 steps, then falls.
    lr = [e.value for e in acc.Scalars("train/lr/dense")]
    assert lr[0] < max(lr) and lr[-1] < max(lr)


def test_checkpoint_from_two_ranks_evaluates_on_one_rank_identically(trained_two_ranks, synth_data):
    final = json.loads((trained_two_ranks / "eval_final.json").read_text())
    out = trained_two_ranks / "eval_one_rank.json"
    run_rectrain(["eval", "--config", str(SYNTH_CONFIG), *_base(synth_data, trained_two_ranks),
                  "--checkpoint", str(trained_two_ranks / "checkpoints"), "--out", str(out)], nproc=1)
    one = json.loads(out.read_text())
    assert one["world_size"] == 1
    assert one["num_samples"] == final["num_samples"]
    assert one["auc"] == pytest.approx(final["auc"], abs=1e-6)
    assert one["logloss"] == pytest.approx(final["logloss"], rel=1e-9, abs=1e-9)
    assert one["calibration"] == pytest.approx(final["calibration"], rel=1e-9)


def test_checkpoint_from_one_rank_evaluates_on_two_ranks_identically(synth_data, tmp_path):
    base = _base(synth_data, tmp_path, train__max_steps=12, eval__at_end=False)
    run_rectrain(["train", "--config", str(SYNTH_CONFIG), *base], nproc=1)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eval_{n}.json"
        run_rectrain(["eval", "--config", str(SYNTH_CONFIG), *base, "--checkpoint", str(tmp_path / "checkpoints"),
                      "--out", str(out)], nproc=n)
        results[n] = json.loads(out.read_text())
    assert results[2]["world_size"] == 2
    assert results[1]["num_samples"] == results[2]["num_samples"] == 8_000
    assert results[2]["auc"] == pytest.approx(results[1]["auc"], abs=1e-6)
    assert results[2]["logloss"] == pytest.approx(results[1]["logloss"], rel=1e-9, abs=1e-9)
    assert results[1]["auc"] > 0.5


def _final_params(run_dir, tmp_path, name):
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(ckpts[-1]), str(out))
    return torch.load(out, weights_only=False)


def test_stop_and_resume_reproduces_the_uninterrupted_run(synth_data, tmp_path):
    # 2 ranks x 2 DataLoader workers; shuffle windows smaller than a rank's share, so the
    # cursor must restore worker rotation, window permutation and offset exactly.
    common = dict(train__max_steps=24, train__log_every=1, eval__at_end=False, checkpoint__every_steps=0,
                  data__num_workers=2, data__shuffle_buffer_rows=3000, data__batch_size=256)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_rectrain(["train", "--config", str(SYNTH_CONFIG), *_base(synth_data, straight, **common)], nproc=2)
    run_rectrain(["train", "--config", str(SYNTH_CONFIG),
                  *_base(synth_data, resumed, train__stop_at_step=11, **common)], nproc=2)
    assert [p.name for p in (resumed / "checkpoints").glob("step_*")] == ["step_00000011"]
    run_rectrain(["train", "--config", str(SYNTH_CONFIG), *_base(synth_data, resumed, **common)], nproc=2)

    def losses(run):
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
        return {r["step"]: r["loss"] for r in rows}

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]

    pa, pb = _final_params(straight, tmp_path, "a"), _final_params(resumed, tmp_path, "b")
    model_a, model_b = pa["model"], pb["model"]
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    # Optimizer state (fused row-wise Adagrad momentum, Adam moments) matches too.
    flat_a = {k: v for k, v in _flatten(pa["optim"]).items() if isinstance(v, torch.Tensor)}
    flat_b = {k: v for k, v in _flatten(pb["optim"]).items() if isinstance(v, torch.Tensor)}
    assert flat_a.keys() == flat_b.keys() and flat_a
    for key in flat_a:
        assert torch.equal(flat_a[key], flat_b[key]), key
    state = json.loads(pb["train_state"])
    assert state["step"] == 24 and state["samples"] == json.loads(pa["train_state"])["samples"]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
