"""The Trainer: builds model, sharding, data, optimizer, checkpointer and logger, then runs
the loop. One code path for one process and for N torchrun workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data.batch import Batch
from trainer.best import best_tracker
from trainer.build import build_evaluator, build_sharded_model, build_stream
from trainer.checkpoint import Checkpointer, check_writable
from trainer.config import ConfigError, RunConfig
from trainer.config_diff import describe, resume_conflicts
from trainer.distributed import DistContext, all_gather_objects, all_reduce_max, init_distributed
from trainer.errors import RunError
from trainer.evaluate import flatten_metrics, lookup_metric
from trainer.host import keep_freed_memory, release_freed_memory
from trainer.loader import close_loader, make_loader, padded_batches
from trainer.logger import RunLogger, setup_console
from trainer.optim import LRSchedule, build_optimizer
from trainer.pipeline import pipelined_steps
from trainer.precision import DensePrecision, all_to_all_dtypes, table_bytes
from trainer.run_state import TrainState, capture_rng, restore_rng, seed_everything
from trainer.sharding import format_plan_rows, plan_rows
from trainer.train_module import NonFiniteLoss, train_stats
from trainer.window import LogWindow

log = logging.getLogger("rectrain")


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.train.device)
        setup_console(self.ctx.rank)
        seed_everything(cfg.train.seed)
        if cfg.train.keep_freed_memory:
            keep_freed_memory()
        # Found now, not at the first save hours from now (every rank checks; all agree).
        check_writable(cfg.checkpoint_dir)
        check_writable(cfg.train.run_dir)
        self.precision = DensePrecision(cfg.precision.dense, self.ctx.device)
        self.model, self.rec_model, self.plan, self.schema = build_sharded_model(cfg, self.ctx, self.precision)
        self.precision_report = {"table_bytes": table_bytes(self.model), "all_to_all": all_to_all_dtypes(self.model)}
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.train_stream = build_stream(cfg, self.schema, self.ctx, cfg.data.train_path, train=True)
        self._train_loader = None  # made by the first epoch, closed when fit() ends
        self.evaluator = (build_evaluator(cfg, self.rec_model, self.schema, self.ctx, cfg.data.eval_path)
                          if cfg.data.eval_path else None)
        self.schedule = LRSchedule(self.optimizer, self.model.fused_optimizer, cfg.optimizer, 1)
        # Every epoch has the same length: slots are balanced to within one row.
        self._set_horizon(all_reduce_max(self.train_stream.remaining_batches(), self.ctx.device))
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.run_dir = Path(cfg.train.run_dir)
        self.logger = RunLogger(cfg.log_dir, self.run_dir, self.ctx.is_main, cfg.logging.tensorboard)
        self.state = TrainState(world_size=self.ctx.world_size, config=cfg.to_dict(),
                                global_batch=cfg.data.batch_size * self.ctx.world_size,
                                steps_per_epoch=self.steps_per_epoch)
        self.tasks = self.rec_model.tasks
        self._window = LogWindow(len(self.schema.features), len(self.tasks))
        self.rank_samples = 0  # real samples this rank trained on (summed across ranks when saved)
        self.best = best_tracker(cfg.eval, self.tasks)
        self._task_weights = torch.tensor([t.weight for t in self.tasks], device=self.ctx.device)  # no copy per step
        self._last_eval: tuple[int, dict] | None = None

    def _set_horizon(self, steps_per_epoch: int) -> None:
        """The run's length in steps (epochs, capped by train.max_steps): the LR schedule's horizon."""
        self.steps_per_epoch = steps_per_epoch
        full = steps_per_epoch * self.cfg.train.epochs
        self.total_steps = min(self.cfg.train.max_steps, full) if self.cfg.train.max_steps else full
        self.schedule.total_steps = max(1, self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    def app_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "train_state": ""}

    def save(self) -> Path:
        self.state.samples = sum(all_gather_objects(self.rank_samples))
        self.state.data = all_gather_objects(self.train_stream.state_dict())
        self.state.rng = all_gather_objects(capture_rng())
        self.state.best = self.best.state_dict() if self.best else {}
        self.state.grad_scaler = self.precision.state_dict()
        state = self.app_state()
        state["train_state"] = self.state.to_json()
        path = self.checkpointer.save(self.state.step, state, keep=self._best_checkpoint())
        log.info("saved checkpoint %s", path)
        return path

    def _best_checkpoint(self) -> Path | None:
        if not (self.best and self.cfg.checkpoint.keep_best and self.best.state.value is not None):
            return None
        return self.checkpointer.directory / f"step_{self.best.state.step:08d}"

    def resume(self) -> bool:
        """Load the latest complete checkpoint in the checkpoint dir, if any (checkpoint.resume:
        auto refuses a changed config, force takes it, never refuses to mix with an old run)."""
        self.checkpointer.clean_partial()
        path = self.checkpointer.latest()
        if path is None:
            return False
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            raise ConfigError(f"config key 'checkpoint.resume': is 'never' but {self.checkpointer.directory} holds "
                              f"checkpoints up to {path.name}; choose a new train.run_dir (or checkpoint.dir), "
                              f"delete them, or resume with 'auto'")
        saved = TrainState.from_json(self.checkpointer.load(path, {"train_state": ""})["train_state"])
        conflicts = resume_conflicts(saved.config, self.cfg.to_dict())
        if conflicts and mode == "auto":
            raise ConfigError(f"config key 'checkpoint.resume': {path} was written with another config ("
                              f"{describe(conflicts)}); revert those keys, use a new train.run_dir, or "
                              f"--set checkpoint.resume=force")
        if conflicts:
            log.warning("resuming with a changed config (checkpoint.resume=force): %s", describe(conflicts))
        _init_optimizer_state(self.optimizer, self.model.fused_optimizer)
        state = self.checkpointer.load(path, {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()})
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.state.step, self.state.epoch = saved.step, saved.epoch
        self.state.skipped_steps = saved.skipped_steps
        self.precision.load_state_dict(saved.grad_scaler)
        self.rank_samples = saved.samples if self.ctx.is_main else 0
        if self.best:
            self.best.load_state_dict(saved.best)
        self._keep_run_meaning(saved)
        same_layout = saved.world_size == self.ctx.world_size and \
            int(saved.data[0]["num_slots"]) == self.train_stream.num_slots
        if same_layout:
            self.state.step_in_epoch = saved.step_in_epoch
            self.train_stream.load_state_dict(saved.data[self.ctx.rank])
            restore_rng(saved.rng[self.ctx.rank])
        else:
            self.state.step_in_epoch = 0
            self.train_stream.carry_over(saved.data)
            log.warning("checkpoint was written by %d ranks, now %d (or data.num_workers changed): model and "
                        "optimizer resharded; epoch %d goes on with the rows no rank had read (this rank: %d "
                        "batches of %d)", saved.world_size, self.ctx.world_size, saved.epoch,
                        self.train_stream.remaining_batches(), self.train_stream.batch_size)
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)
        return True

    def _keep_run_meaning(self, saved: TrainState) -> None:
        """At another world size, keep the global batch (rows per step) and the LR horizon of the
        run's first start, so the schedule and the end point do not move."""
        world = self.ctx.world_size
        if saved.global_batch:
            if saved.global_batch % world:
                raise ConfigError(f"config key 'data.batch_size': the run's global batch is {saved.global_batch} "
                                  f"rows, which {world} ranks cannot share evenly; resume on a world size that "
                                  f"divides it")
            self.train_stream.batch_size = saved.global_batch // world
            self.state.global_batch = saved.global_batch
        if saved.steps_per_epoch:
            self._set_horizon(saved.steps_per_epoch)
            self.state.steps_per_epoch = saved.steps_per_epoch

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        resumed = self.resume()
        if resumed:
            self.logger.rewind(self.state.step)
        else:
            self.train_stream.set_epoch(0)
        self._describe()
        final_metrics: dict = {}
        stopped = False
        finished_before = resumed and self._finished()
        try:
            while not stopped and not self._finished():
                stopped = self._train_epoch()
        except RunError:  # raised on every rank together (NaN loss, failed save): keep the pending save
            self.checkpointer.finalize()
            raise
        finally:
            close_loader(self._train_loader)
            self._train_loader = None
        if stopped:
            log.info("stopped at step %d (train.stop_at_step); run the same command again to resume",
                     self.state.step)
        elif finished_before:
            log.info("the run in %s already finished at step %d; nothing to do", self.run_dir, self.state.step)
            final = self.run_dir / "eval_final.json"
            final_metrics = json.loads(final.read_text()) if final.is_file() else {}
        else:
            if self.cfg.eval.at_end and self.evaluator is not None:
                final_metrics = self.run_eval()
                self.evaluator.report(self.logger, self.state.step)
                if self.ctx.is_main:
                    (self.run_dir / "eval_final.json").write_text(json.dumps(final_metrics) + "\n")
            if self.cfg.checkpoint.at_end and not self.checkpointer.has_step(self.state.step):
                self.save()
            self.logger.hparams(_flat_hparams(self.cfg), flatten_metrics(final_metrics))
        self.checkpointer.close()  # the last async save completes (renamed) before the run reports
        self._report_saves()
        self.logger.close()
        samples = sum(all_gather_objects(self.rank_samples))
        result = {"step": self.state.step, "samples_trained": samples, "stopped": stopped,
                  "early_stopped": self._early_stopped(), "skipped_steps": self.state.skipped_steps,
                  "precision": {**self.precision_report, **self.precision.summary()}, **final_metrics}
        if self.best and self.best.state.value is not None:
            best_ckpt = self._best_checkpoint()
            result["best"] = {"metric": self.best.metric, "value": self.best.state.value,
                              "step": self.best.state.step, "checkpoint": str(best_ckpt) if best_ckpt else None}
        return result

    def _early_stopped(self) -> bool:
        return bool(self.best and self.best.should_stop)

    def _finished(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return (self.state.epoch >= self.cfg.train.epochs or bool(max_steps and self.state.step >= max_steps)
                or self._early_stopped())

    def _train_epoch(self) -> bool:
        """Train to the end of the epoch (or of the run); True when stopped by train.stop_at_step."""
        cfg = self.cfg
        remaining = all_reduce_max(self.train_stream.remaining_batches(), self.ctx.device)
        if cfg.train.max_steps:
            remaining = min(remaining, cfg.train.max_steps - self.state.step)
        last_step = self.state.step + remaining
        if self._train_loader is None:  # its workers live across epochs (trainer/loader.py says why)
            self._train_loader = make_loader(self.train_stream, self.ctx.device, cfg.data.prefetch_factor,
                                             persistent=True)
        batches = padded_batches(self._train_loader, remaining, self.train_stream)
        progress = self._progress_bar()
        self.model.train()
        for batch, task_losses, stats in self._steps(batches):
            self.train_stream.advance(batch)
            self.state.step += 1
            self.state.step_in_epoch += 1
            if task_losses is not None:  # None: a skipped non-finite step
                self._window.add(batch, task_losses, self._task_weights, stats)
                self.rank_samples += batch.num_samples
            progress.update(1)
            step = self.state.step
            self.release_memory_if_due(step)
            if step % cfg.train.log_every == 0 or step == last_step:
                self._log_train(step)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                self.run_eval()
            if ((cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
                    or step == cfg.train.stop_at_step) and not self.checkpointer.has_step(step):
                self.save()
            if step == cfg.train.stop_at_step:
                progress.close()
                return True
            if self._early_stopped():
                log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.5f at "
                         "step %d)", step, self.best.metric, self.best.patience, self.best.state.value,
                         self.best.state.step)
                break
        progress.close()
        if self._early_stopped():
            return False
        if all_reduce_max(self.train_stream.remaining_batches(), self.ctx.device) == 0:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self.train_stream.set_epoch(self.state.epoch)
        return False

    def _steps(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, torch.Tensor, dict]]:
        """(batch, task losses [T], the model's train stats) per optimizer step. GPU: TrainPipelineSparseDist overlaps the input
        all-to-all of batch i+1 with batch i's compute. CPU: a plain loop."""
        # Skipping a non-finite step needs the forward apart from the backward: the plain loop.
        # A model with a lookup the pipeline cannot prefetch (sampled negatives) runs the plain loop too,
        # and so does fp16 (the pipeline's own backward and step know no GradScaler).
        if (self.ctx.device.type == "cuda" and self.cfg.train.non_finite_loss == "error"
                and getattr(self.rec_model, "pipelineable", True) and self.precision.scaler is None):
            boundaries = [n for n in (self.cfg.eval.every_steps, self.cfg.checkpoint.every_steps) if n]
            yield from pipelined_steps(self.model, self.optimizer, self.ctx.device, batches, self.state.step,
                                       boundaries, self.cfg.train.stop_at_step,
                                       lambda: self.schedule.apply(self.state.step))
            return
        for batch in batches:
            self.schedule.apply(self.state.step)
            self.optimizer.zero_grad()
            try:
                loss, (task_losses, outputs, *_) = self.model(batch)
            except NonFiniteLoss as e:
                self._skip_non_finite(e)
                yield batch, None, {}
                continue
            self.precision.backward(loss)  # scaled under fp16
            self.precision.step(self.optimizer)
            yield batch, task_losses, train_stats(outputs)

    def release_memory_if_due(self, step: int) -> bool:
        """train.release_freed_memory_every: the kept free heap pages go back to the OS."""
        every = self.cfg.train.release_freed_memory_every
        return bool(self.cfg.train.keep_freed_memory and every and step % every == 0) and release_freed_memory()

    def _skip_non_finite(self, error: NonFiniteLoss) -> None:
        """Apply train.non_finite_loss to a step whose loss is NaN/Inf (nothing was updated)."""
        step, cfg = self.state.step + 1, self.cfg.train
        if cfg.non_finite_loss == "error" or self.state.skipped_steps >= cfg.max_skipped_steps:
            self.checkpointer.finalize()  # a pending save passed its NaN scan: keep it before stopping
        latest = self.checkpointer.latest()
        where = f"the last checkpoint, {latest.name}, is intact" if latest else "no checkpoint was written"
        if cfg.non_finite_loss == "error":
            raise NonFiniteLoss(f"step {step}: {error}; nothing was updated from it and {where}; lower the "
                                f"learning rates, set optimizer.grad_clip_norm, check the data, or set "
                                f"train.non_finite_loss=skip")
        self.state.skipped_steps += 1
        log.warning("step %d: %s; update skipped (%d skipped so far, train.max_skipped_steps=%d)", step, error,
                    self.state.skipped_steps, cfg.max_skipped_steps)
        if self.state.skipped_steps > cfg.max_skipped_steps:
            raise NonFiniteLoss(f"step {step}: {error}; {self.state.skipped_steps} steps skipped, more than "
                                f"train.max_skipped_steps={cfg.max_skipped_steps}; {where}; lower the learning "
                                f"rates or check the data")

    # ------------------------------------------------------------------ evaluation and logs
    def run_eval(self) -> dict:
        """Evaluate the current model (once per step) and track the best evaluation."""
        step = self.state.step
        if self._last_eval is not None and self._last_eval[0] == step:
            return self._last_eval[1]
        metrics = self.evaluator(self.model)
        self._last_eval = (step, metrics)
        flat = flatten_metrics(metrics)
        self.logger.scalars(step, flat, "eval")
        log.info("eval @ step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in flat.items() if isinstance(v, float)))
        self._track_best(step, metrics)
        return metrics

    def _track_best(self, step: int, metrics: dict) -> None:
        """Update the best evaluation; with checkpoint.keep_best, save a new best at once and
        record it in <checkpoint dir>/best.json."""
        if not self.best or not self.best.update(step, lookup_metric(metrics, self.best.metric)):
            return
        log.info("new best %s=%.5f at step %d", self.best.metric, self.best.state.value, step)
        if self.cfg.checkpoint.keep_best:
            path = self.save()
            if self.ctx.is_main:
                record = {"metric": self.best.metric, "value": self.best.state.value, "step": step,
                          "checkpoint": str(path), "metrics": metrics}
                (self.checkpointer.directory / "best.json").write_text(json.dumps(record) + "\n")

    def _log_train(self, step: int) -> None:
        w = self._window.reduce(self.ctx.device)
        if not self.ctx.is_main:
            return
        lrs = {f"lr/{name or 'embedding'}": opt.param_groups[0]["lr"]
               for name, opt in self.optimizer.optimizers if opt.param_groups}
        task_losses = {}
        if len(self.tasks) > 1:
            task_losses = {f"loss/{t.name}": v for t, v in zip(self.tasks, w["task_losses"])}
        values = {"loss": w["loss"], **task_losses, **w["stats"], "samples_per_sec": w["samples_per_sec"],
                  "lr_factor": self.schedule.factor(step - 1)}
        self.logger.scalars(step, {**values, **lrs}, "train")
        self.logger.scalars(step, w["counters"], "data")
        per_task = "".join(f" {k[5:]}={v:.5f}" for k, v in task_losses.items())
        counters = " ".join(f"{k}={int(v)}" for k, v in w["counters"].items() if v)
        log.info("step %d/%d loss=%.5f%s samples/s=%.0f%s", step, self.total_steps, w["loss"], per_task,
                 w["samples_per_sec"], f" | data: {counters}" if counters else "")

    def _describe(self) -> None:
        text = format_plan_rows(plan_rows(self.plan))
        self.logger.text("sharding_plan", text)
        p = self.cfg.precision
        log.info("world size %d on %s; %d steps/epoch, %d steps in all; precision: dense %s, tables %s (%.2f MiB), "
                 "all-to-all %s\n%s", self.ctx.world_size, self.ctx.device, self.steps_per_epoch, self.total_steps,
                 p.dense, p.embeddings, self.precision_report["table_bytes"]["total"] / 2**20,
                 self.precision_report["all_to_all"]["forward"], text)

    def _progress_bar(self):
        from tqdm import tqdm

        enabled = self.ctx.is_main and self.cfg.logging.progress_bar
        return tqdm(total=self.total_steps, initial=self.state.step, disable=not enabled, dynamic_ncols=True,
                    desc="train", mininterval=2.0)

    def _report_saves(self) -> None:
        totals = self.checkpointer.totals
        if totals["saves"]:
            log.info("%d checkpoint(s): %.2f s writing, training blocked %.2f s (%.2f s saved by async saves)",
                     totals["saves"], totals["write_s"], totals["blocking_s"], totals["saved_s"])


def _init_optimizer_state(optimizer, fused) -> None:
    """Materialize the lazy state of the unfused optimizers so DCP can load into it in place
    (FBGEMM allocates the fused state up front)."""
    for _, opt in optimizer.optimizers:
        if opt is not fused:
            opt.init_state()
    optimizer.zero_grad()


def _flat_hparams(cfg: RunConfig) -> dict:
    return {
        "model": cfg.model.name, "embedding_dim": cfg.model.embedding_dim, "batch_size": cfg.data.batch_size,
        "embedding_optimizer": cfg.optimizer.embedding, "embedding_lr": cfg.optimizer.embedding_lr,
        "dense_optimizer": cfg.optimizer.dense, "dense_lr": cfg.optimizer.dense_lr, "epochs": cfg.train.epochs,
        "world_size": dist.get_world_size(),
    }
