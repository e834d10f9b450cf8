"""The Trainer: builds model, sharding, data, optimizer, checkpointer and logger, then runs
the loop. One code path for one process and for N torchrun workers."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from data.batch import Batch
from data.parquet import ParquetStream
from data.schema import COUNTER_NAMES, Schema
from models import build_model
from models.registry import ModelInputs
from trainer.checkpoint import Checkpointer
from trainer.config import RunConfig
from trainer.distributed import DistContext, all_gather_objects, all_reduce_max, init_distributed
from trainer.evaluate import evaluate
from trainer.loader import make_loader, padded_batches
from trainer.logger import RunLogger, setup_console
from trainer.optim import LRSchedule, build_optimizer
from trainer.run_state import TrainState, capture_rng, restore_rng, seed_everything
from trainer.sharding import format_plan_rows, plan_rows, shard_model
from trainer.train_module import TrainModule

log = logging.getLogger("rectrain")


def build_stream(cfg: RunConfig, schema: Schema, ctx: DistContext, path: str, train: bool) -> ParquetStream:
    return ParquetStream(
        path, schema,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        rank=ctx.rank, world_size=ctx.world_size, num_workers=cfg.data.num_workers,
        shuffle=train, shuffle_buffer_rows=cfg.data.shuffle_buffer_rows, seed=cfg.data.seed,
    )


def build_unsharded_model(cfg: RunConfig):
    """(the meta-device RecModel, the data schema it reads)."""
    schema = Schema.from_config(cfg.data, cfg.model)
    inputs = ModelInputs(len(cfg.data.dense_columns), tuple(cfg.data.label_columns), schema.weighted)
    return build_model(cfg.model, inputs), schema


def build_sharded_model(cfg: RunConfig, ctx: DistContext):
    """(DMP-wrapped TrainModule, the unwrapped RecModel, the sharding plan, the schema)."""
    rec_model, schema = build_unsharded_model(cfg)
    model, plan = shard_model(TrainModule(rec_model), cfg, ctx.device)
    return model, rec_model, plan, schema


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.train.device)
        setup_console(self.ctx.rank)
        seed_everything(cfg.train.seed)
        self.model, self.rec_model, self.plan, self.schema = build_sharded_model(cfg, self.ctx)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.train_stream = build_stream(cfg, self.schema, self.ctx, cfg.data.train_path, train=True)
        self.eval_stream = (
            build_stream(cfg, self.schema, self.ctx, cfg.data.eval_path, train=False) if cfg.data.eval_path else None
        )
        # Every epoch has the same length: slots are balanced to within one row.
        self.steps_per_epoch = all_reduce_max(self.train_stream.remaining_batches(), self.ctx.device)
        full = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(cfg.train.max_steps, full) if cfg.train.max_steps else full
        self.schedule = LRSchedule(self.optimizer, self.model.fused_optimizer, cfg.optimizer, self.total_steps)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
        self.run_dir = Path(cfg.train.run_dir)
        self.logger = RunLogger(cfg.log_dir, self.run_dir, self.ctx.is_main, cfg.logging.tensorboard)
        self.state = TrainState(world_size=self.ctx.world_size, config=cfg.to_dict())
        self._window = _Window(len(self.schema.features))
        self.rank_samples = 0  # real samples this rank trained on (summed across ranks when saved)

    # ------------------------------------------------------------------ checkpoints
    def app_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "train_state": ""}

    def save(self) -> Path:
        self.state.samples = sum(all_gather_objects(self.rank_samples))
        self.state.data = all_gather_objects(self.train_stream.state_dict())
        self.state.rng = all_gather_objects(capture_rng())
        state = self.app_state()
        state["train_state"] = self.state.to_json()
        path = self.checkpointer.save(self.state.step, state)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self) -> bool:
        """Load the latest complete checkpoint in the checkpoint dir, if any."""
        self.checkpointer.clean_partial()
        path = self.checkpointer.latest() if self.cfg.checkpoint.resume == "auto" else None
        if path is None:
            return False
        _init_optimizer_state(self.optimizer, self.model.fused_optimizer)
        state = self.checkpointer.load(path, self.app_state())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        saved = TrainState.from_json(state["train_state"])
        self.state.step, self.state.epoch = saved.step, saved.epoch
        self.rank_samples = saved.samples if self.ctx.is_main else 0
        if saved.world_size == self.ctx.world_size:
            self.state.step_in_epoch = saved.step_in_epoch
            self.train_stream.load_state_dict(saved.data[self.ctx.rank])
            restore_rng(saved.rng[self.ctx.rank])
        else:
            log.warning("checkpoint was written by %d ranks, now %d: model and optimizer resharded; the data "
                        "cursor restarts epoch %d from its beginning", saved.world_size, self.ctx.world_size,
                        saved.epoch)
            self.state.step_in_epoch = 0
            self.train_stream.set_epoch(saved.epoch)
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        if not self.resume():
            self.train_stream.set_epoch(0)
        self._describe()
        final_metrics: dict = {}
        stopped = False
        while self.state.step < self.total_steps and not stopped:
            stopped = self._train_epoch()
        if stopped:
            log.info("stopped at step %d (train.stop_at_step); run the same command again to resume",
                     self.state.step)
        else:
            if self.cfg.eval.at_end and self.eval_stream is not None:
                final_metrics = self.run_eval()
                if self.ctx.is_main:
                    (self.run_dir / "eval_final.json").write_text(json.dumps(final_metrics) + "\n")
            if self.cfg.checkpoint.at_end and not self._saved_at(self.state.step):
                self.save()
            self.logger.hparams(_flat_hparams(self.cfg), {k: v for k, v in final_metrics.items()
                                                        if isinstance(v, float)})
        self.logger.close()
        samples = sum(all_gather_objects(self.rank_samples))
        return {"step": self.state.step, "samples_trained": samples, "stopped": stopped, **final_metrics}

    def _train_epoch(self) -> bool:
        """Train to the end of the epoch (or of the run); True when stopped by train.stop_at_step."""
        cfg = self.cfg
        remaining = min(self.steps_per_epoch - self.state.step_in_epoch, self.total_steps - self.state.step)
        loader = make_loader(self.train_stream, self.ctx.device, cfg.data.prefetch_factor)
        batches = padded_batches(loader, remaining, self.train_stream)
        progress = self._progress_bar()
        self.model.train()
        for batch, loss in self._steps(batches):
            self.train_stream.advance(batch)
            self.state.step += 1
            self.state.step_in_epoch += 1
            self._window.add(batch, loss)
            self.rank_samples += batch.batch_size if batch.slot >= 0 else 0
            progress.update(1)
            step = self.state.step
            if step % cfg.train.log_every == 0 or step == self.total_steps:
                self._log_train(step)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != self.total_steps:
                self.run_eval()
            if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or step == cfg.train.stop_at_step:
                self.save()
            if step == cfg.train.stop_at_step:
                progress.close()
                return True
        progress.close()
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self.train_stream.set_epoch(self.state.epoch)
        return False

    def _steps(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """(batch, loss) per optimizer step. GPU: TrainPipelineSparseDist overlaps the input
        all-to-all of batch i+1 with batch i's compute. CPU: a plain loop."""
        if self.ctx.device.type == "cuda":
            yield from self._pipelined_steps(batches)
            return
        for batch in batches:
            self.schedule.apply(self.state.step)
            self.optimizer.zero_grad()
            loss, _ = self.model(batch)
            loss.backward()
            self.optimizer.step()
            yield batch, loss.detach()

    def _pipelined_steps(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        # Eval and checkpoints need the plain model, so the pipeline runs in segments that end
        # at those steps; `execute_all_batches` drains each segment.
        boundaries = [s for s in (self.cfg.eval.every_steps, self.cfg.checkpoint.every_steps) if s]
        pending: deque[Batch] = deque()
        batches = iter(batches)
        while True:
            segment = _take_until_boundary(batches, self.state.step, boundaries, self.cfg.train.stop_at_step)
            first = next(segment, None)
            if first is None:
                return
            feed = _recording(itertools.chain([first], segment), pending)
            pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device, execute_all_batches=True)
            while True:
                self.schedule.apply(self.state.step)
                try:
                    loss, _, _, _ = pipeline.progress(feed)
                except StopIteration:
                    break
                yield pending.popleft(), loss
            if hasattr(pipeline, "detach"):
                pipeline.detach()

    # ------------------------------------------------------------------ evaluation and logs
    def run_eval(self) -> dict:
        metrics = evaluate(self.model, self.rec_model.tasks, self.eval_stream, self.ctx.device,
                           self.cfg.eval.max_batches)
        self.logger.scalars(self.state.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "eval")
        log.info("eval @ step %d: %s", self.state.step,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def _log_train(self, step: int) -> None:
        w = self._window.reduce(self.ctx.device)
        if not self.ctx.is_main:
            return
        lrs = {f"lr/{name or 'embedding'}": opt.param_groups[0]["lr"]
               for name, opt in self.optimizer.optimizers if opt.param_groups}
        values = {"loss": w["loss"], "samples_per_sec": w["samples_per_sec"], "lr_factor": self.schedule.factor(step - 1)}
        self.logger.scalars(step, {**values, **lrs}, "train")
        self.logger.scalars(step, w["counters"], "data")
        log.info("step %d/%d loss=%.5f samples/s=%.0f", step, self.total_steps, w["loss"], w["samples_per_sec"])

    def _describe(self) -> None:
        text = format_plan_rows(plan_rows(self.plan))
        self.logger.text("sharding_plan", text)
        log.info("world size %d on %s; %d steps/epoch, %d steps in all\n%s", self.ctx.world_size,
                 self.ctx.device, self.steps_per_epoch, self.total_steps, text)

    def _progress_bar(self):
        from tqdm import tqdm

        enabled = self.ctx.is_main and self.cfg.logging.progress_bar
        return tqdm(total=self.total_steps, initial=self.state.step, disable=not enabled, dynamic_ncols=True,
                    desc="train", mininterval=2.0)

    def _saved_at(self, step: int) -> bool:
        latest = self.checkpointer.latest()
        return latest is not None and latest.name == f"step_{step:08d}"


class _Window:
    """Loss, samples and id-policy counters since the last log, reduced across ranks on demand
    (the only host sync of the loop happens at logging steps)."""

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.samples = 0
        self.id_stats = np.zeros((self.num_features, 3), dtype=np.int64)
        self.null_dense = 0
        self.started = time.perf_counter()

    def add(self, batch: Batch, loss: torch.Tensor) -> None:
        n = batch.batch_size if batch.slot >= 0 else 0
        self.loss_sum = self.loss_sum + loss * n
        self.samples += n
        if batch.id_stats.size:
            self.id_stats += batch.id_stats
        self.null_dense += batch.null_dense

    def reduce(self, device: torch.device) -> dict:
        loss = self.loss_sum if isinstance(self.loss_sum, torch.Tensor) else torch.tensor(self.loss_sum)
        packed = torch.cat([
            loss.detach().double().reshape(1).to(device),
            torch.tensor([self.samples, self.null_dense], dtype=torch.float64, device=device),
            torch.from_numpy(self.id_stats.sum(axis=0).astype(np.float64)).to(device),
        ])
        dist.all_reduce(packed)
        values = packed.tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        samples = int(values[1])
        counters = {f"{name}_ids": values[3 + i] for i, name in enumerate(COUNTER_NAMES)}
        counters["null_dense_values"] = values[2]
        self.reset()
        return {"loss": values[0] / max(samples, 1), "samples": samples, "samples_per_sec": samples / elapsed,
                "counters": counters}


def _init_optimizer_state(optimizer, fused) -> None:
    """Materialize the lazy state of the unfused optimizers so DCP can load into it in place
    (FBGEMM allocates the fused state up front)."""
    for _, opt in optimizer.optimizers:
        if opt is not fused:
            opt.init_state()
    optimizer.zero_grad()


def _take_until_boundary(batches, step: int, boundaries: list[int], stop_at: int):
    """Batches up to the next eval/checkpoint/stop step."""
    while True:
        step += 1
        batch = next(batches, None)
        if batch is None:
            return
        yield batch
        if step == stop_at or any(step % b == 0 for b in boundaries):
            return


def _recording(batches, pending: deque):
    for batch in batches:
        pending.append(batch)
        yield batch


def _flat_hparams(cfg: RunConfig) -> dict:
    return {
        "model": cfg.model.name, "embedding_dim": cfg.model.embedding_dim, "batch_size": cfg.data.batch_size,
        "embedding_optimizer": cfg.optimizer.embedding, "embedding_lr": cfg.optimizer.embedding_lr,
        "dense_optimizer": cfg.optimizer.dense, "dense_lr": cfg.optimizer.dense_lr, "epochs": cfg.train.epochs,
        "world_size": dist.get_world_size(),
    }
