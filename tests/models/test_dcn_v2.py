"""models/cross.py, dcn_v2 and dlrm_dcnv2: the cross layers against their formulas, initialization
the way DistributedModelParallel does it, forward/backward of both models, config validation and
the MLPerf config. CPU only, no process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.cross import CrossNet, FullRankCrossLayer, LowRankCrossLayer, MixtureCrossLayer
from models.dcn_v2 import DCNv2Config
from models.dlrm_dcnv2 import DLRMDCNv2Config
from models.registry import MODELS, ArchConfigError, ModelInputs, build_model
from tests.models.helpers import kjt, materialize
from trainer.config import ConfigError, ModelConfig, TableConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64
FEATURES = ["f_a", "f_b", "f_c"]
SIZES = {"f_a": 11, "f_b": 7, "f_c": 5}
E = 4
D = 3
B = 4


def _x(n: int, batch: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=g, dtype=F64), torch.randn(batch, n, generator=g, dtype=F64)


# --------------------------------------------------------------------------- cross layers vs formulas


def test_full_rank_layer_is_x0_times_wx_plus_b_plus_x():
    n = 6
    layer = FullRankCrossLayer(n).to(F64)
    x0, x = _x(n)
    w, b = layer.linear.weight.detach(), layer.linear.bias.detach()
    assert w.shape == (n, n) and b.shape == (n,)
    want = x0 * (x @ w.T + b) + x
    torch.testing.assert_close(layer(x0, x), want)
    # per sample, written out element-wise: x1_i = x0_i * (sum_j W_ij x_j + b_i) + x_i
    s = 2
    for i in range(n):
        row = sum(w[i, j] * x[s, j] for j in range(n)) + b[i]
        torch.testing.assert_close(layer(x0, x)[s, i], x0[s, i] * row + x[s, i])


def test_low_rank_layer_is_x0_times_u_vt_x_plus_b_plus_x():
    n, r = 7, 3
    layer = LowRankCrossLayer(n, r).to(F64)
    x0, x = _x(n)
    v = layer.v.weight.detach().T  # V [N, r]
    u = layer.u.weight.detach()  # U [N, r]
    b = layer.u.bias.detach()
    assert v.shape == (n, r) and u.shape == (n, r) and layer.v.bias is None
    want = x0 * ((x @ v) @ u.T + b) + x
    torch.testing.assert_close(layer(x0, x), want)
    # it is the full-rank layer with W = U Vᵀ
    full = FullRankCrossLayer(n).to(F64)
    with torch.no_grad():
        full.linear.weight.copy_(u @ v.T)
        full.linear.bias.copy_(b)
    torch.testing.assert_close(layer(x0, x), full(x0, x))


def _mixture_by_hand(layer: MixtureCrossLayer, x0: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k G_k(x) · x0 ⊙ (U_k tanh(C_k tanh(V_kᵀ x)) + b) + x, one expert at a time, reading the
    stored weights directly; and the gate weights G [B, K]."""
    r, k_experts = layer.rank, layer.num_experts
    wv, wc, wu = layer.v.weight.detach(), layer.c.weight.detach(), layer.u.weight.detach()
    b = layer.u.bias.detach()
    logits = x @ layer.gate.weight.detach().T  # [B, K]
    gates = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    out = x.clone()
    for k in range(k_experts):
        v_k = wv[k * r:(k + 1) * r].T  # [N, r]
        c_k = wc[k * r:(k + 1) * r]  # [r, r]
        u_k = wu[:, k * r:(k + 1) * r]  # [N, r]
        h = torch.tanh(torch.tanh(x @ v_k) @ c_k.T)  # [B, r]
        expert = x0 * (h @ u_k.T + b)
        out = out + gates[:, k:k + 1] * expert
    return out, gates


@pytest.mark.parametrize("num_experts", [2, 4])
def test_mixture_layer_matches_the_formula_and_its_gates_sum_to_one(num_experts):
    n, r = 6, 3
    layer = MixtureCrossLayer(n, r, num_experts).to(F64)
    x0, x = _x(n, batch=7, seed=num_experts)
    want, gates = _mixture_by_hand(layer, x0, x)
    got_gates = layer.gate_weights(x)
    assert got_gates.shape == (7, num_experts)
    assert (got_gates >= 0).all()
    torch.testing.assert_close(got_gates.sum(dim=1), torch.ones(7, dtype=F64))
    torch.testing.assert_close(got_gates, gates)
    torch.testing.assert_close(layer(x0, x), want)
    assert layer.v.bias is None and layer.c.bias is None and layer.gate.bias is None
    # expert(k) gives the same blocks the formula used
    v_k, c_k, u_k = layer.expert(1)
    assert v_k.shape == (n, r) and c_k.shape == (r, r) and u_k.shape == (n, r)
    torch.testing.assert_close(v_k, layer.v.weight[r:2 * r].T)
    torch.testing.assert_close(u_k, layer.u.weight[:, r:2 * r])


def test_mixture_gates_depend_on_the_input():
    layer = MixtureCrossLayer(5, 2, 3).to(F64)
    _, x = _x(5, batch=2)
    g = layer.gate_weights(x)
    assert not torch.allclose(g[0], g[1])


@pytest.mark.parametrize("low_rank,num_experts,layer_type", [
    (0, 1, FullRankCrossLayer), (3, 1, LowRankCrossLayer), (3, 2, MixtureCrossLayer)])
def test_cross_net_stacks_layers_each_fed_x0(low_rank, num_experts, layer_type):
    n, num_layers = 6, 3
    net = CrossNet(n, num_layers, low_rank=low_rank, num_experts=num_experts).to(F64)
    assert len(net.layers) == num_layers and all(type(m) is layer_type for m in net.layers)
    assert net.out_features == n
    x0, _ = _x(n)
    x = x0
    for layer in net.layers:  # x_{l+1} = f_l(x0, x_l), each layer's formula written out
        x = _by_hand(layer, x0, x)
    out = net(x0)
    assert out.shape == x0.shape  # [B, N] -> [B, N]
    torch.testing.assert_close(out, x)


def _by_hand(layer: nn.Module, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(layer, FullRankCrossLayer):
            return x0 * (x @ layer.linear.weight.T + layer.linear.bias) + x
        if isinstance(layer, LowRankCrossLayer):
            return x0 * ((x @ layer.v.weight.T) @ layer.u.weight.T + layer.u.bias) + x
        return _mixture_by_hand(layer, x0, x)[0]


def test_two_full_rank_layers_by_hand():
    n = 5
    net = CrossNet(n, 2).to(F64)
    x0, _ = _x(n)
    l1, l2 = net.layers[0].linear, net.layers[1].linear
    x1 = x0 * (x0 @ l1.weight.T + l1.bias) + x0
    x2 = x0 * (x1 @ l2.weight.T + l2.bias) + x1
    torch.testing.assert_close(net(x0), x2)


def test_cross_net_rejects_bad_arguments():
    with pytest.raises(ValueError, match="low_rank > 0"):
        CrossNet(4, 2, low_rank=0, num_experts=2)
    with pytest.raises(ValueError):
        CrossNet(4, 0)


# --------------------------------------------------------------------------- initialization as DMP does it


def _dmp_materialize(module: nn.Module, seed: int) -> nn.Module:
    """DMP's materialization (to_empty + reset_parameters) with NaN in new memory; tables untouched."""
    return materialize(module, seed, nan_fill=True, tables=False)


def _initialized(params: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters that are not finite or are all zero."""
    return [name for name, p in params.items() if not torch.isfinite(p).all() or not p.abs().sum() > 0]


@pytest.mark.parametrize("low_rank,num_experts", [(0, 1), (4, 1), (4, 3)])
def test_cross_net_built_on_meta_is_fully_initialized_by_reset_parameters(low_rank, num_experts):
    def build():
        return CrossNet(10, 3, low_rank=low_rank, num_experts=num_experts, device=torch.device("meta"))

    meta = build()
    assert all(p.is_meta for p in meta.parameters())
    a = dict(_dmp_materialize(build(), seed=0).named_parameters())
    b = dict(_dmp_materialize(build(), seed=1).named_parameters())
    assert a and not _initialized(a), _initialized(a)
    assert not _initialized(b)
    for name in a:
        assert not torch.equal(a[name], b[name]), f"{name}: same values under two seeds (not initialized)"
        assert a[name].std() > 0, name
    # and the materialized net computes finite outputs
    out = _dmp_materialize(build(), seed=2)(torch.randn(4, 10))
    assert torch.isfinite(out).all()


def test_the_init_check_catches_parameter_lists_without_reset_parameters():
    """Negative control: TorchRec's LowRankCrossNet keeps its weights in ParameterLists that no
    `reset_parameters` covers, so after DMP's materialization they are left as garbage."""
    net = LowRankCrossNet(10, num_layers=2, low_rank=4).to(torch.device("meta"))
    params = dict(_dmp_materialize(net, seed=0).named_parameters())
    bad = _initialized(params)
    assert bad and len(bad) == len(params), bad


# --------------------------------------------------------------------------- models


def _model_cfg(name: str, arch, dims: dict[str, int] | None = None, embedding_dim: int = E) -> ModelConfig:
    tables = [TableConfig(name=f"t_{f}", features=[f], num_embeddings=SIZES[f], embedding_dim=(dims or {}).get(f, 0))
              for f in FEATURES]
    return ModelConfig(name=name, embedding_dim=embedding_dim, tables=tables, arch=arch)


def _materialize(model: nn.Module, seed: int = 0) -> nn.Module:
    return materialize(model, seed, nan_fill=True)


def _build(name: str, arch, labels=("label",), dims=None, num_dense: int = D) -> nn.Module:
    model = build_model(_model_cfg(name, arch, dims), ModelInputs(num_dense=num_dense, label_names=tuple(labels)))
    assert all(p.is_meta for p in model.parameters()), "models are built on the meta device"
    return _materialize(model)


def _kjt() -> KeyedJaggedTensor:
    return kjt({"f_a": [[1], [2, 3], [], [10]], "f_b": [[0], [6], [1, 1], [2]], "f_c": [[4, 0], [], [3], [3]]},
               FEATURES)


def _forward_backward(model, labels):
    dense = torch.randn(B, D)
    outputs = model(dense, _kjt())
    assert list(outputs) == list(labels)
    for name in labels:
        assert outputs[name].shape == (B,)
        assert torch.isfinite(outputs[name]).all()
    loss, _ = model.loss(outputs, torch.randint(0, 2, (B, len(labels))).float(), torch.ones(B))
    loss.backward()
    return outputs


def _assert_grads(module: nn.Module, what: str) -> None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert linears, what
    for layer in linears:
        g = layer.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, what


VARIANTS = {
    "full_rank": dict(),
    "low_rank": dict(low_rank=3),
    "mixture": dict(low_rank=3, num_experts=3),
}


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_dcn_v2_forward_and_gradients(structure, variant, labels):
    arch = DCNv2Config(cross_layers=2, deep_arch=[8, 5], structure=structure, **VARIANTS[variant])
    model = _build("dcn_v2", arch, labels=labels)
    n = D + E * len(FEATURES)
    assert model.input_arch.out_features == n
    assert model.head.in_features == (n + 5 if structure == "parallel" else 5)
    assert model.head.out_features == len(labels)
    _forward_backward(model, labels)
    _assert_grads(model.cross, "cross net")
    _assert_grads(model.deep, "deep MLP")
    _assert_grads(model.head, "head")


def test_dcn_v2_with_dense_mlp_mixed_table_dims_and_cross_only():
    arch = DCNv2Config(dense_arch=[6], cross_layers=1, low_rank=2, deep_arch=[])
    model = _build("dcn_v2", arch, dims={"f_a": 8, "f_b": 2})  # f_c at model.embedding_dim (4)
    assert model.input_arch.out_features == 6 + 8 + 2 + 4
    assert model.deep is None and model.head.in_features == 20  # stacked, no deep: head on the cross output
    _forward_backward(model, ("label",))
    _assert_grads(model.input_arch.dense_arch, "dense MLP")
    _assert_grads(model.cross, "cross net")


def test_dcn_v2_without_dense_features():
    model = _build("dcn_v2", DCNv2Config(cross_layers=1, deep_arch=[4]), num_dense=0)
    out = model(torch.zeros(B, 0), _kjt())["label"]
    assert out.shape == (B,) and torch.isfinite(out).all()
    with pytest.raises(ArchConfigError, match=r"model\.arch\.dense_arch"):
        _build("dcn_v2", DCNv2Config(dense_arch=[4]), num_dense=0)


@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_dlrm_dcnv2_forward_shapes(labels):
    arch = DLRMDCNv2Config(dense_arch=[8, E], cross_layers=3, low_rank=5, over_arch=[16, 8])
    model = _build("dlrm_dcnv2", arch, labels=labels)
    n = E * (len(FEATURES) + 1)  # [bottom MLP output, every embedding]
    assert model.input_arch.out_features == n
    assert len(model.interaction.layers) == 3
    assert all(isinstance(m, LowRankCrossLayer) and m.v.out_features == 5 for m in model.interaction.layers)
    assert model.over_arch[0].in_features == n
    assert isinstance(model.over_arch[-1], nn.Linear) and model.over_arch[-1].out_features == len(labels)
    _forward_backward(model, labels)
    _assert_grads(model.interaction, "cross interaction")
    _assert_grads(model.over_arch, "top MLP")
    _assert_grads(model.input_arch.dense_arch, "bottom MLP")


def test_dlrm_dcnv2_x0_is_the_bottom_output_then_the_embeddings():
    model = _build("dlrm_dcnv2", DLRMDCNv2Config(dense_arch=[8, E], low_rank=2))
    dense = torch.randn(B, D)
    x0 = model.input_arch(dense, _kjt())
    torch.testing.assert_close(x0[:, :E], model.input_arch.dense_arch(dense))
    w = model.input_arch.embedding_bag_collection.embedding_bags["t_f_a"].weight  # f_a bags: [1], [2, 3], [], [10]
    torch.testing.assert_close(x0[:, E:2 * E], torch.stack([w[1], w[2] + w[3], torch.zeros(E), w[10]]))
    assert x0.shape == (B, E * (len(FEATURES) + 1))


def test_dlrm_dcnv2_needs_uniform_dims_matching_the_bottom_mlp():
    with pytest.raises(ArchConfigError, match=r"model\.arch\.dense_arch"):
        build_model(_model_cfg("dlrm_dcnv2", DLRMDCNv2Config(dense_arch=[8, 6])), ModelInputs(D, ("label",)))
    with pytest.raises(ArchConfigError, match=r"model\.tables\[1\]\.embedding_dim"):
        build_model(_model_cfg("dlrm_dcnv2", DLRMDCNv2Config(dense_arch=[8, E]), dims={"f_b": 8}),
                    ModelInputs(D, ("label",)))
    with pytest.raises(ArchConfigError, match=r"data\.dense_columns"):
        build_model(_model_cfg("dlrm_dcnv2", DLRMDCNv2Config(dense_arch=[8, E])), ModelInputs(0, ("label",)))


def test_registered():
    assert MODELS["dcn_v2"].config is DCNv2Config
    assert MODELS["dlrm_dcnv2"].config is DLRMDCNv2Config


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("cls,kwargs,key", [
    (DCNv2Config, dict(cross_layers=0), "cross_layers"),
    (DCNv2Config, dict(low_rank=-1), "low_rank"),
    (DCNv2Config, dict(num_experts=0), "num_experts"),
    (DCNv2Config, dict(num_experts=4, low_rank=0), "num_experts"),
    (DCNv2Config, dict(structure="side_by_side"), "structure"),
    (DCNv2Config, dict(structure="parallel", deep_arch=[]), "deep_arch"),
    (DCNv2Config, dict(deep_arch=[64, 0]), "deep_arch"),
    (DCNv2Config, dict(dense_arch=[-3]), "dense_arch"),
    (DCNv2Config, dict(dropout=1.0), "dropout"),
    (DLRMDCNv2Config, dict(dense_arch=[]), "dense_arch"),
    (DLRMDCNv2Config, dict(cross_layers=0), "cross_layers"),
    (DLRMDCNv2Config, dict(low_rank=-2), "low_rank"),
    (DLRMDCNv2Config, dict(num_experts=2, low_rank=0), "num_experts"),
    (DLRMDCNv2Config, dict(over_arch=[0]), "over_arch"),
    (DLRMDCNv2Config, dict(dropout=-0.1), "dropout"),
])
def test_arch_config_errors_name_the_key(cls, kwargs, key):
    with pytest.raises(ArchConfigError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert message.startswith(f"config key 'model.arch.{key}': ")
    assert "\n" not in message


@pytest.mark.parametrize("config,override,key", [
    ("dcn_v2_synth.toml", 'model.arch.structure="both"', "model.arch.structure"),
    ("dcn_v2_synth.toml", "model.arch.num_experts=3", "model.arch.num_experts"),
    ("dcn_v2_synth.toml", "model.arch.cross_depth=3", "model.arch.cross_depth"),
    ("dlrm_dcnv2_synth.toml", "model.arch.low_rank=-1", "model.arch.low_rank"),
])
def test_config_file_errors_name_the_key(config, override, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        load_config(ROOT / "configs" / config, [override])


# --------------------------------------------------------------------------- shipped configs


def test_mlperf_config_is_the_reference_shape():
    cfg = load_config(ROOT / "configs" / "dlrm_dcnv2_mlperf.toml")
    assert cfg.model.name == "dlrm_dcnv2"
    tables = cfg.model.tables
    assert len(tables) == 26
    assert all(t.num_embeddings <= 40_000_000 for t in tables)
    assert sum(t.num_embeddings == 40_000_000 for t in tables) == 3  # the three tables over the cap
    assert all(t.embedding_dim == 128 for t in tables) and cfg.model.embedding_dim == 128
    arch = cfg.model.arch
    assert (arch.dense_arch, arch.cross_layers, arch.low_rank, arch.num_experts, arch.over_arch) == (
        [512, 256, 128], 3, 512, 1, [1024, 1024, 512, 256])
    assert cfg.data.batch_size * 8 == 65536
    assert (cfg.optimizer.dense, cfg.optimizer.embedding) == ("adagrad", "rowwise_adagrad")
    assert cfg.train.device == "cuda" and cfg.data.id_policy == "modulo"
    assert cfg.data.dense_columns == [f"dense_{i}" for i in range(13)]
    assert cfg.data.sparse_columns == [f"cat_{i}" for i in range(26)]
    model = build_model(cfg.model, ModelInputs(13, ("label",)))  # on meta: no memory
    assert model.input_arch.out_features == 128 * 27 == 3456
    assert model.over_arch[-1].out_features == 1


@pytest.mark.parametrize("config,model", [("dcn_v2_synth.toml", "dcn_v2"), ("dlrm_dcnv2_synth.toml", "dlrm_dcnv2"),
                                          ("dcnv2_criteo_small.toml", "dcn_v2")])
def test_shipped_configs_load_and_build(config, model):
    cfg = load_config(ROOT / "configs" / config)
    assert cfg.model.name == model and len(cfg.model.tables) == 26
    built = build_model(cfg.model, ModelInputs(len(cfg.data.dense_columns), ("label",)))
    assert all(p.is_meta for p in built.parameters())
    if config == "dcnv2_criteo_small.toml":
        assert cfg.data.id_policy == "hash" and cfg.data.dense_transform == "log1p"
        assert all(2**14 <= t.num_embeddings <= 2**18 for t in cfg.model.tables)
        assert cfg.optimizer.embedding_weight_decay > 0 and cfg.model.arch.dropout > 0
