"""The model contract, checked for every registered model through DistributedModelParallel.

For each model: its smallest shipped config in configs/ builds on the meta device, DMP (a
world of one, FBGEMM kernels) materializes it, a real Batch and a padding Batch go forward and
backward, and nothing is left uninitialized.

"Uninitialized" is checked the hard way: DMP materializes with `to_empty()` and then calls
`reset_parameters()` where a module has it. With deterministic mode on, `to_empty` fills new
memory with NaN, so any parameter that DMP's initialization misses stays NaN and fails here
(TorchRec's `LowRankCrossNet`, whose weights sit in `ParameterList`s, is the negative control).
"""

from __future__ import annotations

import tomllib

import pytest
import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch, padding_batch
from models import MODELS
from models.registry import RecModel, register
from tests.conftest import ROOT
from trainer.build import build_unsharded_model
from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown
from trainer.sharding import shard_model
from trainer.train_module import TrainModule

CPU = torch.device("cpu")


def _table_bytes(raw: dict) -> int:
    model = raw.get("model", {})
    return sum(t["num_embeddings"] * (t.get("embedding_dim") or model.get("embedding_dim", 16))
               for t in model.get("tables", []))


def smallest_config_per_model() -> dict[str, str]:
    """model name -> its shipped config with the fewest embedding parameters."""
    best: dict[str, tuple[int, str]] = {}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        name = raw.get("model", {}).get("name", "dlrm")
        size = _table_bytes(raw)
        if name not in best or size < best[name][0]:
            best[name] = (size, str(path))
    return {name: path for name, (_, path) in best.items()}


CONFIGS = smallest_config_per_model()


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    init_distributed("cpu")
    yield
    shutdown()


def random_batch(schema, tasks, batch_size: int = 16, seed: int = 0, one_id: tuple[str, ...] = ()) -> Batch:
    """A real Batch in the schema's layout: 0-3 ids per bag (empty bags included), exactly one
    for the `one_id` features (a retrieval model's item id), 0/1 labels for binary tasks and
    real values for regression ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(schema.features), batch_size), generator=g)
    for i, f in enumerate(schema.features):
        if f.name in one_id:
            lengths[i] = 1
    values = torch.cat([torch.randint(0, f.num_embeddings, (int(lengths[i].sum()),), generator=g)
                        for i, f in enumerate(schema.features)])
    labels = torch.rand(batch_size, len(schema.label_columns), generator=g)
    for t in tasks:
        if t.kind == "binary":
            labels[:, t.label_index] = (labels[:, t.label_index] > 0.5).float()
    sparse = KeyedJaggedTensor(keys=schema.feature_names, values=values, lengths=lengths.flatten().int(),
                               weights=torch.rand(len(values), generator=g) if schema.weighted else None)
    return Batch(dense=torch.randn(batch_size, schema.num_dense, generator=g), sparse=sparse, labels=labels,
                 weights=torch.ones(batch_size))


def _local(t) -> torch.Tensor:
    if hasattr(t, "local_shards"):
        shards = t.local_shards()
        return torch.cat([s.tensor.flatten() for s in shards]) if shards else torch.zeros(0)
    return t.to_local() if hasattr(t, "to_local") else t


def shard_with_nan_fill(cfg):
    """Build on meta and wrap in DMP with uninitialized memory filled with NaN."""
    model, schema = build_unsharded_model(cfg)
    assert all(p.is_meta for p in model.parameters()), "models must be built on the meta device"
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        dmp, _ = shard_model(TrainModule(model), cfg, CPU)
    finally:
        torch.use_deterministic_algorithms(False)
    return dmp, model, schema


def non_finite_state(dmp) -> list[str]:
    return [k for k, v in dmp.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(_local(v)).all()]


def test_every_model_has_a_config():
    missing = sorted(set(MODELS) - set(CONFIGS))
    assert not missing, f"registered models without a config in configs/: {missing}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_keeps_the_contract(name):
    cfg = load_config(CONFIGS[name], ['train.device="cpu"'])
    dmp, model, schema = shard_with_nan_fill(cfg)
    assert not non_finite_state(dmp), f"{name}: left uninitialized by DMP: {non_finite_state(dmp)}"
    tasks = model.tasks
    assert [t.name for t in tasks] == [t.name for t in cfg.model.tasks]

    item_feature = getattr(model, "item_id_feature", None)
    batch = random_batch(schema, tasks, one_id=(item_feature,) if item_feature else ())
    loss, (task_losses, outputs, labels, weights) = dmp(batch)
    for t in tasks:
        if t.kind == "retrieval":  # outputs are embeddings, not one score per task
            assert outputs["query"].shape[0] == outputs["candidate"].shape[0] == batch.batch_size, name
            assert outputs["candidates"].shape[0] >= batch.batch_size
            assert all(torch.isfinite(outputs[k]).all() for k in ("query", "candidate", "candidates"))
            continue
        assert outputs[t.name].shape == (batch.batch_size,), (name, t.name)
        assert torch.isfinite(outputs[t.name]).all()
    assert task_losses.shape == (len(tasks),)
    assert torch.isfinite(loss) and loss.item() > 0
    want = sum(t.weight * task_losses[i] for i, t in enumerate(tasks))
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    grads = [p.grad for p in dmp.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    dmp.zero_grad()
    pad = padding_batch(schema.num_dense, schema.feature_names, len(schema.label_columns), schema.weighted)
    pad_loss, (pad_task_losses, pad_outputs, _, _) = dmp(pad)
    assert pad_loss.item() == 0.0 and pad_task_losses.abs().sum().item() == 0.0
    assert all(torch.isfinite(pad_outputs["query" if t.kind == "retrieval" else t.name]).all() for t in tasks)
    pad_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dmp.parameters())


def test_the_check_catches_a_parameter_list_that_dmp_does_not_initialize():
    """Negative control: TorchRec's LowRankCrossNet built on meta is left as NaN by DMP."""

    class WithTorchRecCrossNet(RecModel):
        def __init__(self, model_cfg, inputs, tasks):
            super().__init__(tasks)
            self.dlrm = MODELS["dlrm"].builder(model_cfg, inputs, tasks)
            self.cross = LowRankCrossNet(4, num_layers=1, low_rank=2)
            self.cross.to(torch.device("meta"))

        def forward(self, dense, sparse):
            return self.dlrm(dense, sparse)

    register("contract_negative_control", config=MODELS["dlrm"].config)(WithTorchRecCrossNet)
    try:
        cfg = load_config(CONFIGS["dlrm"], ['train.device="cpu"', 'model.name="contract_negative_control"'])
        dmp, _, _ = shard_with_nan_fill(cfg)
        bad = non_finite_state(dmp)
        assert bad and all(".cross." in k for k in bad), bad
    finally:
        MODELS.pop("contract_negative_control", None)


def test_linear_layers_are_initialized_by_dmp_not_left_at_a_constant():
    cfg = load_config(CONFIGS["dlrm"], ['train.device="cpu"'])
    dmp, _, _ = shard_with_nan_fill(cfg)
    for module in dmp.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.std() > 0
