"""A DCP checkpoint (written by any world size and sharding plan) -> the unsharded RecModel on CPU.

Export needs plain tensors: TorchScript cannot hold ShardedTensor/DTensor, FAISS wants a
numpy matrix. DCP stores every tensor by its global offsets, so loading into a state dict of
full, plain CPU tensors makes it read and stitch every rank's shards (row-wise, column-wise,
table-wise alike) in this one process, no process group needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.registry import RecModel
from trainer.config import ConfigError, RunConfig


def load_cpu_model(cfg: RunConfig, checkpoint: str | Path) -> tuple[RecModel, "object"]:
    """(the RecModel with the checkpoint's weights, in eval mode on CPU; its data Schema).

    Refuses (ConfigError) a config that would read the checkpoint differently than the one it
    was trained with, as `rectrain eval` does."""
    from trainer.build import build_unsharded_model, check_checkpoint_config
    from trainer.checkpoint import Checkpointer
    from trainer.train_module import TrainModule

    check_checkpoint_config(cfg, checkpoint)
    rec_model, schema = build_unsharded_model(cfg)
    # The trainer checkpoints DMP(TrainModule(model)).state_dict(): keys are "model.<name>".
    module = TrainModule(rec_model).to_empty(device="cpu")
    state = module.state_dict()
    transient = _non_persistent_buffers(module)
    if transient:
        # to_empty leaves them uninitialised and no checkpoint holds them
        raise RuntimeError(f"model {cfg.model.name!r} has non-persistent buffers {transient} that a checkpoint "
                           f"cannot restore; make them persistent or recompute them after loading")
    try:
        loaded = Checkpointer.load(checkpoint, {"model": state})["model"]
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP: a key or shape the checkpoint lacks
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{checkpoint}: its model state does not fit model {cfg.model.name!r} of this config "
                          f"({first[:300]}); export with the config it was trained with") from None
    module.load_state_dict(_plain(loaded), strict=True)
    return rec_model.eval(), schema


def _plain(state: dict) -> dict:
    """DCP fills the given plain tensors in place; anything else would mean a sharded type
    slipped in (then the export must not go on with a local shard)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
            raise RuntimeError(f"{key}: loaded as {type(value).__name__}, expected a plain tensor")
    return state


def _non_persistent_buffers(module: torch.nn.Module) -> list[str]:
    names = []
    for prefix, sub in module.named_modules():
        for name in getattr(sub, "_non_persistent_buffers_set", ()):
            names.append(f"{prefix}.{name}" if prefix else name)
    return names
