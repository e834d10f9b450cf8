"""models/wide_deep.py: the wide part reads only the wide group, the deep part only the deep
group; outputs, gradients, feature-group config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from models.registry import MODELS, ModelInputs, build_model
from models.wide_deep import WideDeep, WideDeepConfig
from tests.conftest import ROOT
from tests.models.helpers import kjt, materialize
from tests.models.test_deepfm import BAGS, FEATURES, SIZES, D, E, linear_by_hand, model_cfg, pooled, table
from trainer.build import build_unsharded_model
from trainer.config import ConfigError, load_config

WIDE = ["f_a", "f_b"]
DEEP = ["f_b", "f_c"]
DEEP_DIM_C = 8  # f_c's table has its own dim: the deep part does not need a uniform one
CONFIG = ROOT / "configs" / "wide_deep_synth.toml"


def build(labels=("label",), wide=WIDE, deep=DEEP, seed: int = 0, num_dense: int = D, **arch) -> WideDeep:
    cfg = model_cfg(name="wide_deep", arch=WideDeepConfig(**{"deep_arch": [8, 6], **arch}),
                    feature_groups={"wide": list(wide), "deep": list(deep)})
    cfg.tables[2].embedding_dim = DEEP_DIM_C
    model = build_model(cfg, ModelInputs(num_dense=num_dense, label_names=tuple(labels)))
    return materialize(model, seed)


def with_ids(feature: str, bags: list[list[int]]) -> dict[str, list[list[int]]]:
    return {**BAGS, feature: bags}


OTHER_IDS = [[0, 1], [4], [2], []]  # different ids than BAGS, valid for every table


# --------------------------------------------------------------------------- wide


@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_wide_is_sum_of_wide_group_weights_plus_dense_linear(labels):
    model = build(labels=labels)
    T = len(labels)
    dense = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    got = model.components(dense, kjt(BAGS))["wide"]
    assert got.shape == (4, T)
    assert sorted(model.wide.embedding_bag_collection.embedding_bags) == [f"wide_t_{f}" for f in WIDE]
    want = linear_by_hand(model.wide, "wide_", WIDE, dense, T)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_features_outside_the_wide_group_do_not_move_the_wide_part():
    model = build()
    dense = torch.randn(4, D)
    base = model.components(dense, kjt(BAGS))
    moved = model.components(dense, kjt(with_ids("f_c", OTHER_IDS)))  # deep-only feature
    torch.testing.assert_close(base["wide"], moved["wide"])
    assert not torch.allclose(base["deep"], moved["deep"])


def test_wide_without_dense_term():
    model = build(wide_dense=False)
    assert model.wide.dense_linear is None
    a = model.components(torch.zeros(4, D), kjt(BAGS))["wide"]
    b = model.components(torch.randn(4, D), kjt(BAGS))["wide"]
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- deep


def test_deep_part_only_sees_deep_group_features():
    model = build()
    deep_ebc = model.deep_input.embedding_bag_collection
    assert sorted(deep_ebc.embedding_bags) == [f"t_{f}" for f in DEEP]  # own names: [sharding.tables] applies
    assert table(deep_ebc, "t_f_c").shape == (SIZES["f_c"], DEEP_DIM_C)
    assert model.deep[0].in_features == D + E + DEEP_DIM_C
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    assert len(ebcs) == 2
    dense = torch.randn(4, D)
    base = model.components(dense, kjt(BAGS))
    moved = model.components(dense, kjt(with_ids("f_a", OTHER_IDS)))  # wide-only feature
    torch.testing.assert_close(base["deep"], moved["deep"])
    assert not torch.allclose(base["wide"], moved["wide"])
    # the deep input is exactly [dense, pooled f_b, pooled f_c]
    x = model.deep_input(dense, kjt(BAGS))
    want = [dense.double()] + [torch.stack([pooled(table(deep_ebc, f"t_{f}"), bag) for bag in BAGS[f]])
                               for f in DEEP]
    torch.testing.assert_close(x.double(), torch.cat(want, dim=1), rtol=1e-6, atol=1e-6)


def test_a_feature_in_both_groups_moves_both_parts():
    model = build()
    dense = torch.randn(4, D)
    base = model.components(dense, kjt(BAGS))
    moved = model.components(dense, kjt(with_ids("f_b", OTHER_IDS)))
    assert not torch.allclose(base["wide"], moved["wide"])
    assert not torch.allclose(base["deep"], moved["deep"])


# --------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("labels", [("label",), ("click", "buy", "like")])
def test_forward_returns_one_finite_logit_per_task(labels):
    model = build(labels=labels)
    dense = torch.randn(4, D)
    out = model(dense, kjt(BAGS))
    assert list(out) == list(labels)
    parts = model.components(dense, kjt(BAGS))
    for k, name in enumerate(labels):
        assert out[name].shape == (4,) and torch.isfinite(out[name]).all()
        torch.testing.assert_close(out[name], parts["wide"][:, k] + parts["deep"][:, k])


def test_kjt_key_order_does_not_matter():
    model = build()
    dense = torch.randn(4, D)
    a = model(dense, kjt(BAGS))["label"]
    b = model(dense, kjt(BAGS, keys=list(reversed(FEATURES))))["label"]
    torch.testing.assert_close(a, b)


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
    assert model.wide.dense_linear in linears
    for layer in linears:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    for f in FEATURES:
        used = sorted({i for bag in BAGS[f] for i in bag})
        unused = [i for i in range(SIZES[f]) if i not in used]
        if f in WIDE:
            g = table(model.wide.embedding_bag_collection, f"wide_t_{f}").grad
            assert (g[used, :T] != 0).all() and (g[:, T:] == 0).all() and (g[unused] == 0).all(), f
        if f in DEEP:
            g = table(model.deep_input.embedding_bag_collection, f"t_{f}").grad
            assert (g[used].abs().sum(dim=1) > 0).all() and (g[unused] == 0).all(), f


def test_without_dense_columns():
    model = build(num_dense=0)
    assert model.wide.dense_linear is None
    out = model(torch.zeros(4, 0), kjt(BAGS))["label"]
    assert out.shape == (4,) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- config


def test_registered_with_its_feature_groups():
    assert MODELS["wide_deep"].config is WideDeepConfig
    assert WideDeepConfig.feature_groups == ("wide", "deep")
    cfg = model_cfg(name="wide_deep", arch=WideDeepConfig(), feature_groups={"wide": WIDE, "deep": DEEP})
    model = build_model(cfg, ModelInputs(num_dense=D, label_names=("label",)))
    assert isinstance(model, WideDeep) and all(p.is_meta for p in model.parameters())


def test_shipped_config_builds():
    cfg = load_config(CONFIG)
    assert cfg.model.name == "wide_deep" and isinstance(cfg.model.arch, WideDeepConfig)
    model, _ = build_unsharded_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    wide = model.wide.embedding_bag_collection.embedding_bag_configs()
    deep = model.deep_input.embedding_bag_collection.embedding_bag_configs()
    assert len(wide) == len(cfg.model.feature_groups["wide"])
    assert all(t.embedding_dim == 4 and t.name.startswith("wide_") for t in wide)
    assert {f for t in deep for f in t.feature_names} == set(cfg.model.feature_groups["deep"])
    assert all(t.type != "row_wise" for t in cfg.sharding.tables.values())


@pytest.mark.parametrize("group", ["wide", "deep"])
def test_missing_feature_group_is_a_one_line_config_error(group):
    other = "deep" if group == "wide" else "wide"
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [f'model.feature_groups={{ {other} = ["cat_0"] }}'])
    msg = str(e.value)
    assert f"'model.feature_groups.{group}'" in msg and "wide_deep" in msg and "\n" not in msg


def test_feature_group_naming_an_unknown_feature_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'model\.feature_groups\.wide'.*cat_99"):
        load_config(CONFIG, ['model.feature_groups.wide=["cat_0", "cat_99"]'])


def test_feature_group_subset_builds():
    cfg = load_config(CONFIG, ['model.feature_groups.wide=["cat_0", "cat_3"]'])
    model, _ = build_unsharded_model(cfg)
    assert model.wide.feature_names == ["cat_0", "cat_3"]


def test_feature_listed_twice_in_a_group_is_an_error():
    cfg = model_cfg(name="wide_deep", arch=WideDeepConfig(), feature_groups={"wide": ["f_a", "f_a"], "deep": DEEP})
    with pytest.raises(ValueError, match=r"'model\.feature_groups\.wide'.*twice"):
        build_model(cfg, ModelInputs(num_dense=D, label_names=("label",)))


@pytest.mark.parametrize("override,key", [
    ("model.arch.deep_arch=[]", "model.arch.deep_arch"),
    ("model.arch.dropout=-0.1", "model.arch.dropout"),
    ('model.arch.wide_dense="yes"', "model.arch.wide_dense"),
])
def test_bad_arch_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [override])
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)
