"""models/deepfm.py and models/fm.py: the FM identity, the first-order term, shared embeddings,
outputs, gradients and config checks, on a meta-built model materialized on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from models.deepfm import DeepFM, DeepFMConfig
from models.fm import DenseFMFields, FieldProjection, TaskScales, fm_interaction, fm_second_order, linear_table_dim
from models.registry import MODELS, ModelInputs, build_model
from tests.conftest import ROOT
from tests.models.helpers import kjt, materialize
from trainer.build import build_unsharded_model
from trainer.config import ConfigError, ModelConfig, TableConfig, load_config

FEATURES = ["f_a", "f_b", "f_c"]
SIZES = {"f_a": 11, "f_b": 7, "f_c": 5}
E = 4
D = 3
# Single-hot, multi-hot and empty bags; batch of 4.
BAGS = {
    "f_a": [[1], [2, 3], [], [10]],
    "f_b": [[0], [6], [1, 1], [2]],
    "f_c": [[4, 0], [], [3], [3, 2, 1]],
}
CONFIG = ROOT / "configs" / "deepfm_synth.toml"


def model_cfg(name: str = "deepfm", arch=None, feature_groups=None, **kw) -> ModelConfig:
    tables = [TableConfig(name=f"t_{f}", features=[f], num_embeddings=SIZES[f]) for f in FEATURES]
    if arch is None:
        arch = DeepFMConfig(deep_arch=[8, 6])
    return ModelConfig(name=name, embedding_dim=E, tables=tables, arch=arch, feature_groups=feature_groups or {},
                       **kw)


def pooled(weight: torch.Tensor, bag: list[int], bag_weights: list[float] | None = None) -> torch.Tensor:
    """Sum pooling by hand, float64; an empty bag pools to zeros."""
    w = weight.detach().double()
    if not bag:
        return torch.zeros(w.shape[1], dtype=torch.float64)
    scale = torch.tensor(bag_weights or [1.0] * len(bag), dtype=torch.float64).unsqueeze(1)
    return (w[bag] * scale).sum(dim=0)


def table(ebc: EmbeddingBagCollection, name: str) -> torch.Tensor:
    return ebc.embedding_bags[name].weight


def pairwise(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The O(N^2) definition: sum over i < j of <v_i, v_j> (each v [B, E])."""
    total = torch.zeros(vectors[0].shape[0], dtype=vectors[0].dtype)
    for a, b in itertools.combinations(vectors, 2):
        total = total + (a * b).sum(dim=-1)
    return total


def linear_by_hand(linear, prefix: str, features: list[str], dense: torch.Tensor, tasks: int) -> torch.Tensor:
    """A LinearArch's output computed from its own weights, float64 [B, T]: the looked-up
    per-task id weights of `features` summed, plus the dense linear term."""
    ebc = linear.embedding_bag_collection
    want = torch.zeros(dense.shape[0], tasks, dtype=torch.float64)
    for f in features:
        weight = table(ebc, f"{prefix}t_{f}")
        assert weight.shape == (SIZES[f], linear_table_dim(tasks))
        for b, bag in enumerate(BAGS[f]):
            want[b] += pooled(weight[:, :tasks], bag)
    return want + dense.double() @ linear.dense_linear.weight.detach().double().t()


def build(labels=("label",), num_dense: int = D, weighted: bool = False, seed: int = 0, **arch) -> DeepFM:
    cfg = model_cfg(arch=DeepFMConfig(**{"deep_arch": [8, 6], **arch}))
    model = build_model(cfg, ModelInputs(num_dense=num_dense, label_names=tuple(labels), weighted=weighted))
    return materialize(model, seed)


# --------------------------------------------------------------------------- the FM identity


@pytest.mark.parametrize("num_fields", [1, 2, 5, 27])
def test_fm_second_order_equals_pairwise_sum(num_fields):
    g = torch.Generator().manual_seed(num_fields)
    v = torch.randn(6, num_fields, 5, generator=g, dtype=torch.float64)
    v[1] = 0.0  # every bag empty
    v[2, : num_fields // 2] = 0.0  # some bags empty
    got = fm_second_order(v)
    want = pairwise([v[:, i] for i in range(num_fields)])
    assert got.shape == (6,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[1].item() == 0.0
    if num_fields == 1:
        assert (got.abs() < 1e-12).all()  # one field has no pair


@pytest.mark.parametrize("mode", ["per_feature", "one_field"])
def test_dense_fields_are_fm_fields(mode):
    g = torch.Generator().manual_seed(1)
    fields = DenseFMFields(D, E, mode, device=torch.device("cpu")).double()
    nn.init.normal_(fields.proj.weight)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    sparse = torch.randn(5, 4, E, generator=g, dtype=torch.float64)
    w = fields.proj.weight.detach()  # [E, D]; column j is dense column j's vector
    if mode == "per_feature":
        dense_vectors = [x[:, j : j + 1] * w[:, j] for j in range(D)]  # x_j * v_j
    else:
        dense_vectors = [x @ w.t()]  # one projected field
    want = pairwise([sparse[:, i] for i in range(4)] + dense_vectors)
    dense_sum, dense_squares = fields(x)
    got = fm_interaction(sparse.sum(dim=1) + dense_sum, sparse.square().sum(dim=1) + dense_squares)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fields.field_vectors(x), torch.stack(dense_vectors, dim=1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dense_fm", ["none", "per_feature", "one_field"])
def test_model_second_order_is_pairwise_over_pooled_bags(dense_fm):
    model = build(dense_fm=dense_fm)
    dense = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    got = model.components(dense, kjt(BAGS))["second_order"]
    ebc = model.sparse_arch.embedding_bag_collection
    vectors = [torch.stack([pooled(table(ebc, f"t_{f}"), bag) for bag in BAGS[f]]) for f in FEATURES]
    w = model.dense_fields.proj.weight.detach().double() if model.dense_fields is not None else None
    x = dense.double()
    if dense_fm == "per_feature":
        vectors += [x[:, j : j + 1] * w[:, j] for j in range(D)]
    elif dense_fm == "one_field":
        vectors.append(x @ w.t())
    else:
        assert model.dense_fields is None
    want = pairwise(vectors)
    assert got.shape == (4,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- first order


@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_first_order_is_sum_of_looked_up_weights_plus_dense_linear(labels):
    model = build(labels=labels)
    dense = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    got = model.components(dense, kjt(BAGS))["first_order"]
    assert got.shape == (4, len(labels))
    want = linear_by_hand(model.first_order, "fm1_", FEATURES, dense, len(labels))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_first_order_uses_id_weights():
    model = build(weighted=True)
    id_weights = {f: [[0.5 + 0.25 * i for i in range(len(bag))] for bag in BAGS[f]] for f in FEATURES}
    dense = torch.zeros(4, D)
    got = model.components(dense, kjt(BAGS, weights=id_weights))["first_order"][:, 0]
    linear = model.first_order.embedding_bag_collection
    want = torch.zeros(4, dtype=torch.float64)
    for f in FEATURES:
        for b, bag in enumerate(BAGS[f]):
            want[b] += pooled(table(linear, f"fm1_t_{f}")[:, :1], bag, id_weights[f][b])[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tasks,dim", [(1, 4), (3, 4), (4, 4), (5, 8)])
def test_linear_tables_are_fbgemm_legal(tasks, dim):
    assert linear_table_dim(tasks) == dim


# --------------------------------------------------------------------------- shared embeddings


def test_fm_and_deep_read_the_same_tables():
    model = build()
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    assert len(ebcs) == 2  # the shared E-dim tables and the first-order weights, nothing else
    shared = model.sparse_arch.embedding_bag_collection
    assert sorted(shared.embedding_bags) == [f"t_{f}" for f in FEATURES]
    assert sorted(model.first_order.embedding_bag_collection.embedding_bags) == [f"fm1_t_{f}" for f in FEATURES]
    emb_params = sum(p.numel() for ebc in ebcs for p in ebc.parameters())
    assert emb_params == sum(SIZES.values()) * (E + linear_table_dim(1))

    dense = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model.components(dense, kjt(BAGS))
        table(shared, "t_f_a")[1] += 1.0  # id 1 of f_a: only in sample 0's bag
        after = model.components(dense, kjt(BAGS))
    for part in ("second_order", "deep"):
        assert not torch.allclose(before[part][0], after[part][0]), part
        torch.testing.assert_close(before[part][1:], after[part][1:])
    torch.testing.assert_close(before["first_order"], after["first_order"])


# --------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("labels", [("label",), ("click", "buy", "like")])
def test_forward_returns_one_finite_logit_per_task(labels):
    model = build(labels=labels)
    dense = torch.randn(4, D)
    out = model(dense, kjt(BAGS))
    assert list(out) == list(labels)
    for name in labels:
        assert out[name].shape == (4,) and torch.isfinite(out[name]).all()
    parts = model.components(dense, kjt(BAGS))
    total = parts["first_order"] + parts["second_order"].unsqueeze(1) + parts["deep"]  # scales start at 1
    for k, name in enumerate(labels):
        torch.testing.assert_close(out[name], total[:, k])
    if len(labels) == 1:
        assert model.fm_scales is None  # plain DeepFM
    else:
        assert isinstance(model.fm_scales, TaskScales) and model.fm_scales.weight.tolist() == [1.0] * len(labels)
    assert model.deep[0].in_features == D + len(FEATURES) * E
    assert model.deep[-1].out_features == len(labels)


def test_per_task_scales_multiply_the_shared_second_order_term():
    model = build(labels=("click", "watch_time"))
    with torch.no_grad():
        model.fm_scales.weight.copy_(torch.tensor([2.0, -0.5]))
    dense = torch.randn(4, D)
    out = model(dense, kjt(BAGS))
    parts = model.components(dense, kjt(BAGS))
    for k, (name, s) in enumerate([("click", 2.0), ("watch_time", -0.5)]):
        want = parts["first_order"][:, k] + s * parts["second_order"] + parts["deep"][:, k]
        torch.testing.assert_close(out[name], want)


def test_dense_field_vectors_start_small():
    """DMP initializes FieldProjection by its reset_parameters: N(0, 0.01^2), not Linear's
    default, so unscaled dense values do not swamp the FM at the start."""
    proj = FieldProjection(50, 64, device=torch.device("cpu"))
    nn.init.constant_(proj.weight, 3.0)
    proj.reset_parameters()
    assert 0.005 < proj.weight.std().item() < 0.015 and abs(proj.weight.mean().item()) < 0.005
    assert proj.bias is None


def test_kjt_key_order_does_not_matter():
    model = build()
    dense = torch.randn(4, D)
    a = model(dense, kjt(BAGS))["label"]
    b = model(dense, kjt(BAGS, keys=list(reversed(FEATURES))))["label"]
    torch.testing.assert_close(a, b)


def test_without_dense_columns():
    model = build(num_dense=0)
    assert model.first_order.dense_linear is None and model.dense_fields is None
    out = model(torch.zeros(4, 0), kjt(BAGS))["label"]
    assert out.shape == (4,) and torch.isfinite(out).all()


@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_gradients_reach_every_part(labels):
    model = build(labels=labels)
    T = len(labels)
    out = model(torch.randn(4, D), kjt(BAGS))
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])[:, :T]
    loss, _ = model.loss(out, y, torch.ones(4))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.first_order.dense_linear in linears and model.dense_fields.proj in linears
    for layer in linears:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    if T > 1:
        assert (model.fm_scales.weight.grad != 0).all()
    for f in FEATURES:
        used = sorted({i for bag in BAGS[f] for i in bag})
        unused = [i for i in range(SIZES[f]) if i not in used]
        shared = table(model.sparse_arch.embedding_bag_collection, f"t_{f}").grad
        assert (shared[used].abs().sum(dim=1) > 0).all() and (shared[unused] == 0).all(), f
        first = table(model.first_order.embedding_bag_collection, f"fm1_t_{f}").grad
        assert (first[used, :T] != 0).all() and (first[:, T:] == 0).all() and (first[unused] == 0).all(), f


# --------------------------------------------------------------------------- config


def test_registered_and_built_on_meta():
    assert MODELS["deepfm"].config is DeepFMConfig
    model = build_model(model_cfg(), ModelInputs(num_dense=D, label_names=("label",)))
    assert isinstance(model, DeepFM)
    assert all(p.is_meta for p in model.parameters())


def test_shipped_config_builds():
    cfg = load_config(CONFIG)
    assert cfg.model.name == "deepfm" and isinstance(cfg.model.arch, DeepFMConfig)
    model, schema = build_unsharded_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    linear = model.first_order.embedding_bag_collection.embedding_bag_configs()
    assert len(linear) == 26 and all(t.embedding_dim == 4 and t.name.startswith("fm1_") for t in linear)
    assert cfg.sharding.default_type in ("table_wise", "column_wise", "data_parallel")
    assert all(t.type != "row_wise" for t in cfg.sharding.tables.values())


@pytest.mark.parametrize("override,key", [
    ("model.arch.deep_arch=[]", "model.arch.deep_arch"),
    ("model.arch.deep_arch=[16, 0]", "model.arch.deep_arch"),
    ("model.arch.dropout=1.0", "model.arch.dropout"),
    ('model.arch.dense_fm="pairs"', "model.arch.dense_fm"),
    ("model.arch.hidden=[4]", "model.arch.hidden"),
])
def test_bad_arch_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_tables_must_share_the_embedding_dim():
    cfg = model_cfg()
    cfg.tables[2].embedding_dim = 8
    with pytest.raises(ValueError, match=r"'model\.tables\[2\]\.embedding_dim'.*deepfm"):
        build_model(cfg, ModelInputs(num_dense=D, label_names=("label",)))
