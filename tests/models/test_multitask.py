"""models/: the multi-task models (shared_bottom, mmoe, ple) built unsharded on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import padding_batch
from models.mmoe import MMoE, MMoEConfig
from models.multitask import LevelGates, MultiTaskModel
from models.ple import PLE, PLEConfig
from models.registry import ArchConfigError, ModelInputs, build_model
from models.shared_bottom import SharedBottom, SharedBottomConfig
from tests.models.helpers import kjt
from tests.models.helpers import materialize as _materialize
from trainer.config import ConfigError, ModelConfig, TableConfig, TaskConfig, config_from_dict

FEATURES = ["f_a", "f_b", "f_c"]
SIZES = {"f_a": 11, "f_b": 7, "f_c": 5}
DIMS = {"f_a": 4, "f_b": 4, "f_c": 3}  # tables may differ in dim: the input is a flat concat
D = 3
B = 6

# Task sets: (name, kind); labels are columns of the same names.
ONE = [("click", "binary")]
TWO = [("click", "binary"), ("watch_time", "regression")]
THREE = [("click", "binary"), ("like", "binary"), ("watch_time", "regression")]

# Model variants: (model name, arch config).
VARIANTS = {
    "shared_bottom": ("shared_bottom", SharedBottomConfig(dense_arch=[5], bottom_arch=[24, 16], tower_arch=[16])),
    "mmoe": ("mmoe", MMoEConfig(num_experts=3, expert_arch=[24, 16], tower_arch=[16])),
    "mmoe_raw_dense": ("mmoe", MMoEConfig(num_experts=2, expert_arch=[16], tower_arch=[])),
    "ple_1": ("ple", PLEConfig(num_levels=1, num_task_experts=2, num_shared_experts=1, expert_arch=[16],
                               tower_arch=[16])),
    "ple_2": ("ple", PLEConfig(num_levels=2, num_task_experts=1, num_shared_experts=2, expert_arch=[24, 16],
                               tower_arch=[16], dense_arch=[5])),
    "ple_3": ("ple", PLEConfig(num_levels=3, num_task_experts=2, num_shared_experts=2, expert_arch=[16],
                               tower_arch=[16])),
}
GATED = ["mmoe", "mmoe_raw_dense", "ple_1", "ple_2", "ple_3"]

BAGS = {
    "f_a": [[1], [2, 3], [], [10], [0, 0, 4], [7]],
    "f_b": [[0], [6], [1, 1], [2], [], [5]],
    "f_c": [[4, 0], [], [3], [3], [1], [2, 4]],
}


def _tables() -> list[TableConfig]:
    return [TableConfig(name=f"t_{f}", features=[f], num_embeddings=SIZES[f], embedding_dim=DIMS[f])
            for f in FEATURES]


def _model_cfg(variant: str, tasks=THREE) -> ModelConfig:
    name, arch = VARIANTS[variant]
    task_cfgs = [TaskConfig(name=n, kind=k) for n, k in tasks]
    return ModelConfig(name=name, embedding_dim=4, tables=_tables(), tasks=task_cfgs, arch=arch)


def _build(variant: str, tasks=THREE, num_dense: int = D, seed: int = 0) -> MultiTaskModel:
    labels = tuple(n for n, _ in tasks)
    model = build_model(_model_cfg(variant, tasks), ModelInputs(num_dense=num_dense, label_names=labels))
    return _materialize(model, seed)


def _kjt(keys=FEATURES) -> KeyedJaggedTensor:
    return kjt(BAGS, keys)


def _inputs(seed: int = 0, num_dense: int = D) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    return torch.randn(B, num_dense, generator=torch.Generator().manual_seed(seed)), _kjt()


def _labels(tasks, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, 2, (B,), generator=g).float() if k == "binary" else torch.rand(B, generator=g) * 5
            for _, k in tasks]
    return torch.stack(cols, dim=1)


# --------------------------------------------------------------------------- build and forward


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_builds_on_meta_with_the_registered_class(variant):
    name, _ = VARIANTS[variant]
    model = build_model(_model_cfg(variant), ModelInputs(num_dense=D, label_names=("click", "like", "watch_time")))
    assert type(model) is {"shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE}[name]
    assert all(p.is_meta for p in model.parameters())
    assert [t.name for t in model.tasks] == ["click", "like", "watch_time"]
    assert [t.kind for t in model.tasks] == ["binary", "binary", "regression"]
    # every parameter outside the embedding tables sits in an nn.Linear, which DMP initializes
    tables = model.input_arch.embedding_bag_collection
    table_params = {id(p) for p in tables.parameters()}
    linear_params = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    assert {id(p) for p in model.parameters()} == table_params | linear_params


@pytest.mark.parametrize("tasks", [ONE, TWO, THREE], ids=["1task", "2tasks", "3tasks"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_gives_one_finite_vector_per_task(variant, tasks):
    model = _build(variant, tasks)
    outputs = model(*_inputs())
    assert list(outputs) == [n for n, _ in tasks]
    for name, out in outputs.items():
        assert out.shape == (B,), name
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all(), name
    # tasks do not share an output: each tower is its own
    if len(tasks) > 1:
        assert not torch.allclose(outputs[tasks[0][0]], outputs[tasks[1][0]])
    total, per_task = model.loss(outputs, _labels(tasks), torch.ones(B))
    assert torch.isfinite(total) and total.item() > 0
    assert per_task.shape == (len(tasks),)


def test_shared_input_width_is_dense_plus_every_embedding():
    raw = _build("mmoe_raw_dense")
    assert raw.input_features == D + sum(DIMS.values())
    assert raw.experts[0][0].in_features == D + sum(DIMS.values())
    bottom = _build("ple_2")  # dense_arch = [5]
    assert bottom.input_features == 5 + sum(DIMS.values())
    assert bottom.input_arch(*_inputs()).shape == (B, 5 + sum(DIMS.values()))


def test_kjt_key_order_does_not_matter():
    model = _build("ple_2").eval()
    dense, kjt = _inputs()
    a = model(dense, kjt)
    b = model(dense, _kjt(keys=list(reversed(FEATURES))))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_no_dense_columns_works_without_a_dense_arch_and_is_an_error_with_one():
    model = _build("mmoe_raw_dense", num_dense=0)
    out = model(*_inputs(num_dense=0))
    assert all(v.shape == (B,) and torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ArchConfigError, match=r"model\.arch\.dense_arch"):
        build_model(_model_cfg("ple_2"), ModelInputs(num_dense=0, label_names=("click", "like", "watch_time")))


def test_dropout_is_active_in_training_only():
    cfg = _model_cfg("mmoe")
    cfg.arch = MMoEConfig(num_experts=2, expert_arch=[16, 8], tower_arch=[8], dropout=0.5)
    model = _materialize(build_model(cfg, ModelInputs(num_dense=D, label_names=("click", "like", "watch_time"))))
    dense, kjt = _inputs()
    model.train()
    torch.manual_seed(1)
    a = model(dense, kjt)["click"]
    b = model(dense, kjt)["click"]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(dense, kjt)["click"], model(dense, kjt)["click"])


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize("tasks", [ONE, THREE], ids=["1task", "3tasks"])
@pytest.mark.parametrize("variant", GATED)
def test_gate_weights_are_distributions_at_every_level(variant, tasks):
    model = _build(variant, tasks).eval()
    dense, kjt = _inputs()
    outputs, gates = model.forward_with_gates(dense, kjt)
    # the inspection path changes nothing
    plain = model(dense, kjt)
    for name in plain:
        torch.testing.assert_close(outputs[name], plain[name])
    arch = VARIANTS[variant][1]
    levels = getattr(arch, "num_levels", 1)
    assert len(gates) == levels and all(isinstance(g, LevelGates) for g in gates)
    num_tasks = len(tasks)
    for level, lg in enumerate(gates):
        assert list(lg.tasks) == [n for n, _ in tasks]
        weights = list(lg.tasks.values())
        if isinstance(model, MMoE):
            want_task, want_shared = arch.num_experts, None
        else:
            want_task = arch.num_task_experts + arch.num_shared_experts
            top = level == levels - 1
            want_shared = None if top else num_tasks * arch.num_task_experts + arch.num_shared_experts
        assert all(w.shape == (B, want_task) for w in weights)
        if want_shared is None:
            assert lg.shared is None
        else:
            assert lg.shared.shape == (B, want_shared)
            weights.append(lg.shared)
        for w in weights:
            assert (w >= 0).all()
            torch.testing.assert_close(w.sum(dim=1), torch.ones(B))


def test_mmoe_task_input_is_the_gate_weighted_sum_of_its_experts():
    model = _build("mmoe").double().eval()
    dense, kjt = _inputs()
    x = model.input_arch(dense.double(), kjt)
    with torch.no_grad():
        mixed = model.task_inputs(x)
        outputs, gates = model.forward_with_gates(dense.double(), kjt)
        experts = [e(x) for e in model.experts]  # E x [B, H]
        for k, task in enumerate(model.tasks):
            g = torch.softmax(model.gates[k](x), dim=1)  # [B, E]
            want = sum(g[:, e:e + 1] * experts[e] for e in range(len(experts)))
            torch.testing.assert_close(mixed[k], want)
            torch.testing.assert_close(gates[0].tasks[task.name], g)
            torch.testing.assert_close(outputs[task.name], model.towers[k](want).squeeze(1))
    # different tasks get different mixtures
    assert not torch.allclose(mixed[0], mixed[1])


def test_ple_levels_mix_own_then_shared_experts_and_feed_the_next_level():
    model = _build("ple_2").double().eval()
    dense, kjt = _inputs()
    x = model.input_arch(dense.double(), kjt)
    low, top = model.levels
    assert low.shared_gate is not None and top.shared_gate is None
    with torch.no_grad():
        def level_by_hand(level, task_x, shared_x):
            shared_out = [e(shared_x) for e in level.shared_experts]
            own_out = [[e(tx) for e in experts] for experts, tx in zip(level.task_experts, task_x)]
            mixed = []
            for k, tx in enumerate(task_x):
                g = torch.softmax(level.task_gates[k](tx), dim=1)
                pool = own_out[k] + shared_out
                mixed.append(sum(g[:, i:i + 1] * pool[i] for i in range(len(pool))))
            if level.shared_gate is None:
                return mixed, None
            g = torch.softmax(level.shared_gate(shared_x), dim=1)
            pool = [o for outs in own_out for o in outs] + shared_out
            return mixed, sum(g[:, i:i + 1] * pool[i] for i in range(len(pool)))

        task_x, shared_x = level_by_hand(low, [x] * 3, x)
        assert shared_x is not None
        task_x, none = level_by_hand(top, task_x, shared_x)
        assert none is None
        got = model.task_inputs(x)
    for k in range(3):
        torch.testing.assert_close(got[k], task_x[k])


def test_ple_experts_are_per_task_and_shared_as_configured():
    model = _build("ple_3")
    arch = VARIANTS["ple_3"][1]
    assert len(model.levels) == 3
    for i, level in enumerate(model.levels):
        assert len(level.task_experts) == 3
        assert all(len(experts) == arch.num_task_experts for experts in level.task_experts)
        assert len(level.shared_experts) == arch.num_shared_experts
        assert all(g.out_features == arch.num_task_experts + arch.num_shared_experts for g in level.task_gates)
        n_in = model.input_features if i == 0 else arch.expert_arch[-1]
        assert all(g.in_features == n_in for g in level.task_gates)
        if i < 2:
            assert level.shared_gate.out_features == 3 * arch.num_task_experts + arch.num_shared_experts
        else:
            assert level.shared_gate is None


# --------------------------------------------------------------------------- gradients and padding


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("tasks", [ONE, THREE], ids=["1task", "3tasks"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_experts_gates_towers_and_tables(variant, tasks):
    model = _build(variant, tasks)
    outputs = model(*_inputs())
    total, _ = model.loss(outputs, _labels(tasks), torch.ones(B))
    total.backward()
    layers = _linear_layers(model)
    kinds = {"towers", "experts", "gates", "task_experts", "shared_experts", "task_gates", "shared_gate", "bottom"}
    seen = {part for name in layers for part in name.split(".") if part in kinds}
    if isinstance(model, MMoE):
        assert {"experts", "gates", "towers"} <= seen
    elif isinstance(model, PLE):
        assert {"task_experts", "shared_experts", "task_gates", "towers"} <= seen
        assert ("shared_gate" in seen) == (VARIANTS[variant][1].num_levels > 1)
    else:
        assert {"bottom", "towers"} <= seen
    for name, layer in layers.items():
        grad = layer.weight.grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    for f in FEATURES:
        grad = model.input_arch.embedding_bag_collection.embedding_bags[f"t_{f}"].weight.grad
        used = sorted({i for bag in BAGS[f] for i in bag})
        assert (grad[used].abs().sum(dim=1) > 0).all(), f


def test_every_task_loss_reaches_the_shared_experts():
    """Each task alone trains the shared parts (that is what makes them shared)."""
    tasks = THREE
    for variant, shared in (("mmoe", lambda m: m.experts[0][0]), ("ple_2", lambda m: m.levels[0].shared_experts[0][0]),
                            ("shared_bottom", lambda m: m.bottom[0])):
        model = _build(variant, tasks)
        for k in range(len(tasks)):
            model.zero_grad()
            _, per_task = model.loss(model(*_inputs()), _labels(tasks), torch.ones(B))
            per_task[k].backward()
            assert shared(model).weight.grad.abs().sum() > 0, (variant, tasks[k])


@pytest.mark.parametrize("tasks", [ONE, TWO, THREE], ids=["1task", "2tasks", "3tasks"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padding_batch_gives_exactly_zero_loss_and_no_gradient(variant, tasks):
    model = _build(variant, tasks)
    pad = padding_batch(D, FEATURES, len(tasks), weighted=False)
    outputs = model(pad.dense, pad.sparse)
    assert all(v.shape == (1,) and torch.isfinite(v).all() for v in outputs.values())
    total, per_task = model.loss(outputs, pad.labels, pad.weights)
    assert total.item() == 0.0
    assert per_task.tolist() == [0.0] * len(tasks)
    total.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_padding_rows_do_not_change_the_loss():
    model = _build("ple_2").eval()
    dense, kjt = _inputs()
    labels = _labels(THREE)
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    full, _ = model.loss(model(dense, kjt), labels, weights)
    moved = labels.clone()
    moved[3:] = 1 - moved[3:] + 7.0  # labels of padding rows are anything
    again, _ = model.loss(model(dense, kjt), moved, weights)
    torch.testing.assert_close(full, again)


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("cls, kwargs, key", [
    (SharedBottomConfig, {"bottom_arch": []}, "bottom_arch"),
    (SharedBottomConfig, {"bottom_arch": [8, 0]}, "bottom_arch"),
    (SharedBottomConfig, {"dense_arch": [-4]}, "dense_arch"),
    (SharedBottomConfig, {"dropout": 1.0}, "dropout"),
    (MMoEConfig, {"num_experts": 0}, "num_experts"),
    (MMoEConfig, {"expert_arch": []}, "expert_arch"),
    (MMoEConfig, {"tower_arch": [16, 0]}, "tower_arch"),
    (MMoEConfig, {"dropout": -0.1}, "dropout"),
    (PLEConfig, {"num_levels": 0}, "num_levels"),
    (PLEConfig, {"num_task_experts": 0}, "num_task_experts"),
    (PLEConfig, {"num_shared_experts": 0}, "num_shared_experts"),
    (PLEConfig, {"expert_arch": [0]}, "expert_arch"),
])
def test_arch_config_errors_name_the_key(cls, kwargs, key):
    with pytest.raises(ArchConfigError, match=rf"'model\.arch\.{key}'"):
        cls(**kwargs)


def _raw_run_config(name: str, arch: dict) -> dict:
    return {
        "data": {"label_columns": ["click", "rating"], "dense_columns": ["d0"], "sparse_columns": FEATURES},
        "model": {"name": name, "embedding_dim": 4,
                  "tables": [{"name": f"t_{f}", "features": [f], "num_embeddings": SIZES[f]} for f in FEATURES],
                  "tasks": [{"name": "click"}, {"name": "rating", "kind": "regression"}],
                  "arch": arch},
    }


@pytest.mark.parametrize("name, arch, key", [
    ("mmoe", {"num_experts": -1}, "num_experts"),
    ("mmoe", {"num_expert": 4}, "num_expert"),  # unknown key
    ("ple", {"num_levels": 0}, "num_levels"),
    ("ple", {"expert_arch": [16, 0]}, "expert_arch"),
    ("shared_bottom", {"tower_arch": "64"}, "tower_arch"),
    ("shared_bottom", {"num_experts": 2}, "num_experts"),  # not a shared-bottom setting
])
def test_run_config_errors_name_the_arch_key(name, arch, key):
    with pytest.raises(ConfigError, match=rf"'model\.arch\.{key}"):
        config_from_dict(_raw_run_config(name, arch))


def test_run_config_builds_typed_arch():
    cfg = config_from_dict(_raw_run_config("ple", {"num_levels": 3, "expert_arch": [16], "dropout": 0.1}))
    assert isinstance(cfg.model.arch, PLEConfig)
    assert (cfg.model.arch.num_levels, cfg.model.arch.expert_arch, cfg.model.arch.dropout) == (3, [16], 0.1)
    assert cfg.model.arch.num_shared_experts == PLEConfig().num_shared_experts
