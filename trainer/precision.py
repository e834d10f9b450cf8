"""Mixed precision (`[precision]`): autocast and loss scaling for the dense part, the sharded
tables' storage dtype, and TorchRec's quantized all-to-all.

- dense: the TrainModule's forward runs the model under `torch.autocast` (bf16 or fp16; CUDA
  and CPU); `models.precision.dense_input` casts the pooled embeddings to that dtype where the
  dense arches take them. The outputs are cast back to fp32 before the loss, so the loss, the
  metrics and the NaN guard stay fp32. fp16 adds a GradScaler: the dense optimizer steps
  through it (unscale, Inf check, skip); the fused embedding optimizer, which runs inside the
  backward kernel, gets the gradient unscaled at `dense_input` (zeroed when it overflowed).
- embeddings: the FBGEMM-fused tables are stored in fp16 (`EmbeddingBagConfig.data_type`, which
  TorchRec turns into the TBE's `weights_precision`), updated with stochastic rounding.
- comms: `QCommsConfig` codecs on the EmbeddingBagCollectionSharder: the pooled-embedding
  all-to-all (forward) and its gradient (backward) travel in fp16 or bf16.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from models.precision import embedding_grad_unscale, fx_tracing

from trainer.config import PrecisionConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 gradients of the pooled embeddings underflow below ~6e-8; TorchRec's DLRM example
# scales them by 128 on the wire (undone on arrival). bf16 has fp32's range and needs none.
FP16_BACKWARD_COMM_SCALE = 128.0


# --------------------------------------------------------------------------- dense part


class DensePrecision:
    """The dense part's dtype: autocast for the forward, loss scaling for fp16."""

    def __init__(self, mode: str = "fp32", device: torch.device | str = "cpu") -> None:
        self.device_type = torch.device(device).type
        self.dtype = DTYPES[mode]
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None
        self.num_tables_modules = 0  # EmbeddingBagCollections whose gradient must be unscaled
        self._boundary = None  # the last fp16 training forward's (its backward notes overflows)

    @contextlib.contextmanager
    def forward(self, training: bool) -> Iterator[None]:
        """Autocast around the model's forward; under fp16 training, the pooled embeddings'
        gradient is unscaled on its way into the tables (and every table module must pass its
        output through `dense_input`, or the fused optimizer would see scaled gradients)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            if not (training and self.scaler is not None):
                yield
                return
            with embedding_grad_unscale(self._scale) as boundary:
                yield
            self._boundary = boundary
            if boundary.calls < self.num_tables_modules:
                raise RuntimeError(f"precision.dense = 'fp16': the model passed {boundary.calls} pooled-embedding "
                                   f"tensors through models.precision.dense_input for {self.num_tables_modules} "
                                   f"embedding collections; the others would feed loss-scaled gradients to the "
                                   f"fused optimizer (fix the model, or use bf16)")

    def _scale(self) -> torch.Tensor:
        return self.scaler._get_scale_async()  # set by scaler.scale(loss), before backward runs

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer) -> None:
        """Step the CombinedOptimizer; under fp16 the dense part goes through the GradScaler (its
        gradients are scaled), the table parts step as usual (theirs arrived unscaled)."""
        if self.scaler is None:
            optimizer.step()
            return
        for name, opt in optimizer.optimizers:
            if name == "dense":
                self.scaler.step(opt)
            else:
                opt.step()
        before = self.scaler._get_scale_async().clone()
        self.scaler.update()
        self._back_off_on_table_overflow(before)

    def _back_off_on_table_overflow(self, before: torch.Tensor) -> None:
        """GradScaler checks only the dense gradients; an Inf/NaN in a gradient into the tables
        (zeroed on its way, see models/precision.py) must lower the scale too, on every rank alike,
        or the tables would get zero gradients step after step. One back-off per step: when the
        dense gradients overflowed as well, GradScaler's own update already backed off from
        `before` (the scale the step ran with). Stays on the device."""
        boundary, self._boundary = self._boundary, None
        if boundary is None or boundary.overflow is None:
            return
        overflow = boundary.overflow.reshape(1)
        if dist.is_initialized():
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        scale = self.scaler._get_scale_async()
        backed_off = torch.minimum(scale, before * self.scaler.get_backoff_factor())
        self.scaler.update(new_scale=torch.where(overflow[0] > 0, backed_off, scale))

    def summary(self) -> dict:
        """{"loss_scale": the current fp16 loss scale} (nothing for fp32/bf16)."""
        return {"loss_scale": self.scaler.get_scale()} if self.scaler is not None else {}

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def output_to_fp32(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs with reduced-precision floats cast back to fp32 (loss and metrics)."""
    if fx_tracing():  # TorchRec's pipeline traces forward only to find the lookups' inputs
        return outputs
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in outputs.items()}


# --------------------------------------------------------------------------- tables


def embedding_collections(model: nn.Module) -> list[nn.Module]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def set_table_dtype(model: nn.Module, mode: str) -> None:
    """Give every table of the unsharded (meta) model the storage dtype `mode` before planning:
    the planner sizes shards by it and the sharded kernels are built in it."""
    from torchrec.modules.embedding_configs import DataType

    data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[mode]
    for ebc in embedding_collections(model):
        for table in ebc.embedding_bag_configs():
            table.data_type = data_type


def keep_data_parallel_fp32(model: nn.Module, plan) -> None:
    """Data-parallel tables are replicated and trained by a regular (unfused) optimizer without
    stochastic rounding: they stay fp32 (they are the small ones)."""
    from torchrec.modules.embedding_configs import DataType

    dp = {table for module_plan in plan.plan.values() for table, ps in module_plan.items()
          if ps.sharding_type == "data_parallel"}
    for ebc in embedding_collections(model):
        for table in ebc.embedding_bag_configs():
            if table.name in dp:
                table.data_type = DataType.FP32


def table_fused_params(cfg: PrecisionConfig) -> dict:
    """FBGEMM settings for the table dtype: stochastic rounding of the fused optimizer's updates
    into fp16 weights (FBGEMM's default, set explicitly)."""
    return {"stochastic_rounding": True} if cfg.embeddings == "fp16" else {}


def qcomm_registry(cfg: PrecisionConfig):
    """TorchRec's quantized-comms codecs for `precision.comms` (None for fp32)."""
    if cfg.comms == "fp32":
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

    comm = {"fp16": CommType.FP16, "bf16": CommType.BF16}[cfg.comms]
    return get_qcomm_codecs_registry(QCommsConfig(
        forward_precision=comm, backward_precision=comm,
        backward_loss_scale=FP16_BACKWARD_COMM_SCALE if cfg.comms == "fp16" else None,
    ))


def table_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the embedding tables as the sharded model holds them (its state_dict tensors,
    which view the kernels' weights): {"total": bytes, "<dtype>": bytes}, summed over ranks,
    replicated (data-parallel) tables counted once."""
    counts: dict[str, int] = {}
    rank = dist.get_rank() if dist.is_initialized() else 0
    for key, value in model.state_dict().items():
        if ".embedding_bags." not in key or not key.endswith(".weight"):
            continue
        if hasattr(value, "local_shards"):  # ShardedTensor: this rank's shards
            tensors = [s.tensor for s in value.local_shards()]
        elif hasattr(value, "to_local"):  # DTensor
            tensors = [value.to_local()]
        else:  # a replicated table: count it once
            tensors = [value] if rank == 0 else []
        for t in tensors:
            name = str(t.dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + t.numel() * t.element_size()
    if dist.is_initialized() and dist.get_world_size() > 1:
        from trainer.distributed import all_gather_objects

        counts = dict(sum((Counter(part) for part in all_gather_objects(counts)), Counter()))
    return {"total": sum(counts.values()), **dict(sorted(counts.items()))}


def all_to_all_dtypes(model: nn.Module) -> dict[str, str]:
    """The dtypes the sharded model's pooled-embedding all-to-alls carry, read from the codecs
    its output dists hold: {"forward": "float16", "backward": "float16"} (fp32 without codecs)."""
    found = {"forward": set(), "backward": set()}
    for module in model.modules():  # a sharded collection keeps its output dists in a plain list
        for output_dist in getattr(module, "_output_dists", None) or []:
            codecs = getattr(output_dist, "_codecs", None)
            if codecs is not None:
                for direction in found:
                    codec = getattr(codecs, direction)
                    dtype = getattr(codec, "quantized_dtype", None) or getattr(codec, "_comm_precision", "?")
                    found[direction].add(str(dtype).replace("torch.", "").lower())
    return {d: ",".join(sorted(v)) or "float32" for d, v in found.items()}
