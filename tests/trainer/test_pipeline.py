"""The GPU step loop (TorchRec's TrainPipelineSparseDist, trainer/pipeline.py) runs on CPU too,
so its contract is checked here: it trains exactly what the plain loop trains."""

from __future__ import annotations

import pytest
import torch

from data.synth import write_synthetic
from trainer.build import build_sharded_model, build_stream
from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown
from trainer.loader import make_loader, padded_batches
from trainer.optim import build_optimizer
from trainer.pipeline import pipelined_steps
from trainer.run_state import seed_everything


@pytest.fixture(scope="module")
def world_of_one():
    ctx = init_distributed("cpu")
    yield ctx
    shutdown()


def _losses(cfg, ctx, pipelined: bool) -> list[float]:
    seed_everything(0)
    model, _, _, schema = build_sharded_model(cfg, ctx)
    optimizer = build_optimizer(model, cfg.optimizer)
    stream = build_stream(cfg, schema, ctx, cfg.data.train_path, train=True)
    stream.set_epoch(0)
    batches = padded_batches(make_loader(stream, ctx.device), stream.remaining_batches(), stream)
    model.train()
    if pipelined:
        return [float(losses.sum()) for _, losses, _ in
                pipelined_steps(model, optimizer, ctx.device, batches, 0, [3], 0, lambda: None)]
    out = []
    for batch in batches:
        optimizer.zero_grad()
        loss, (task_losses, *_) = model(batch)
        loss.backward()
        optimizer.step()
        out.append(float(task_losses.sum()))
    return out


@pytest.mark.parametrize("config", ["dlrm_synth.toml", "deepfm_synth.toml"])
def test_the_pipeline_trains_exactly_what_the_plain_loop_trains(config, world_of_one, tmp_path):
    write_synthetic(tmp_path / "train", 1_800, seed=0)
    cfg = load_config(f"configs/{config}", [f'data.train_path="{tmp_path / "train"}"', "data.num_workers=0",
                                             "data.batch_size=256", "data.shuffle_buffer_rows=0"])
    plain = _losses(cfg, world_of_one, pipelined=False)
    piped = _losses(cfg, world_of_one, pipelined=True)
    assert len(plain) == len(piped) == 8  # 7 full batches and the last 8 rows; a segment boundary at step 3
    assert plain[-1] < plain[0]  # it learns
    assert piped == pytest.approx(plain, rel=1e-5, abs=1e-6)
