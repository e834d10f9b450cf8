"""models/: DLRM built unsharded on CPU, its arches, the registry and RecModel.loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import models
from data.batch import padding_batch
from models.arches import MLP, DotInteraction, SparseArch, pooled_in_order
from models.dlrm import DLRMConfig
from models.registry import MODELS, ModelInputs, RecModel, build_model, register
from models.tasks import BinaryTask, RegressionTask
from tests.models.helpers import kjt as _kjt
from tests.models.helpers import materialize as _materialize
from trainer.config import ModelConfig, TableConfig

FEATURES = ["f_a", "f_b", "f_c"]
SIZES = {"f_a": 11, "f_b": 7, "f_c": 5}
E = 4
D = 3


def _model_cfg(**kw) -> ModelConfig:
    tables = [TableConfig(name=f"t_{f}", features=[f], num_embeddings=SIZES[f]) for f in FEATURES]
    arch = dict(dense_arch=[8, E], over_arch=[6])
    arch.update({k: kw.pop(k) for k in list(kw) if k in ("dense_arch", "over_arch", "dropout")})
    args = dict(name="dlrm", embedding_dim=E, tables=tables, arch=DLRMConfig(**arch))
    args.update(kw)
    return ModelConfig(**args)


def _build(labels=("label",), weighted=False, **cfg_kw):
    model = build_model(_model_cfg(**cfg_kw), ModelInputs(num_dense=D, label_names=tuple(labels), weighted=weighted))
    return _materialize(model)


BAGS = {
    "f_a": [[1], [2, 3], [], [10]],
    "f_b": [[0], [6], [1, 1], [2]],
    "f_c": [[4, 0], [], [3], [3]],
}


# --------------------------------------------------------------------------- build and forward


def test_registry_has_dlrm_and_builds_on_meta():
    assert "dlrm" in MODELS and models.MODELS is MODELS
    model = build_model(_model_cfg(), ModelInputs(num_dense=D, label_names=("label",)))
    assert all(p.is_meta for p in model.parameters())
    assert [t.name for t in model.tasks] == ["label"]


@pytest.mark.parametrize("labels", [("label",), ("click", "buy")])
def test_forward_shape(labels):
    model = _build(labels=labels)
    outputs = model(torch.randn(4, D), _kjt(BAGS))
    assert list(outputs) == list(labels)
    out = torch.stack(list(outputs.values()), dim=1)
    assert out.shape == (4, len(labels))
    assert torch.isfinite(out).all()
    assert [t.label_index for t in model.tasks] == list(range(len(labels)))
    assert [t.name for t in model.tasks] == list(labels)
    # over arch input is E + F(F+1)/2 with F = 3 features
    first = model.over_arch[0]
    assert first.in_features == E + 3 * 4 // 2
    # last layer is linear (no ReLU): outputs can be negative
    assert isinstance(model.over_arch[-1], nn.Linear)
    assert model.over_arch[-1].out_features == len(labels)


def test_forward_accepts_padding_batch():
    model = _build()
    pad = padding_batch(D, FEATURES, 1, weighted=False)
    out = model(pad.dense, pad.sparse)
    assert out["label"].shape == (1,)
    total, per_task = model.loss(out, pad.labels, pad.weights)
    assert total.item() == 0.0 and per_task.tolist() == [0.0]


def test_kjt_key_order_does_not_matter():
    model = _build()
    dense = torch.randn(4, D)
    a = model(dense, _kjt(BAGS))
    b = model(dense, _kjt(BAGS, keys=list(reversed(FEATURES))))
    torch.testing.assert_close(a["label"], b["label"])


def test_weighted_model_uses_id_weights():
    model = _build(weighted=True)
    dense = torch.randn(4, D)
    kjt = _kjt(BAGS, weights=True)
    out = model(dense, kjt)["label"]
    assert out.shape == (4,)
    doubled = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights() * 2)
    assert not torch.allclose(out, model(dense, doubled)["label"])


def test_table_dim_mismatch_raises():
    cfg = _model_cfg()
    cfg.tables[1].embedding_dim = 8
    with pytest.raises(ValueError, match=r"model\.tables\[1\]\.embedding_dim"):
        build_model(cfg, ModelInputs(num_dense=D, label_names=("label",)))


def test_dense_arch_last_must_equal_embedding_dim():
    with pytest.raises(ValueError, match=r"'model\.arch\.dense_arch'.*\(8\).*\(4\)"):
        build_model(_model_cfg(dense_arch=[16, 8]), ModelInputs(num_dense=D, label_names=("label",)))


def test_no_dense_columns_raises():
    with pytest.raises(ValueError, match="data.dense_columns"):
        build_model(_model_cfg(), ModelInputs(num_dense=0, label_names=("label",)))


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError) as e:
        ModelConfig(name="wide_and_deep", tables=_model_cfg().tables)
    msg = str(e.value)
    assert "model.name" in msg and "'wide_and_deep'" in msg
    assert "dlrm" in msg  # lists what is registered


def test_register_twice_raises():
    with pytest.raises(ValueError, match="registered twice"):
        register("dlrm")(lambda cfg, inputs, tasks: None)
    assert "dlrm" in MODELS


def test_register_new_model_is_buildable():
    class Tiny(RecModel):
        pass

    try:
        register("tiny_for_test")(lambda cfg, inputs, tasks: Tiny(tasks))
        m = build_model(_model_cfg(name="tiny_for_test", arch=None), ModelInputs(num_dense=1, label_names=("label",)))
        assert isinstance(m, Tiny)
        assert [t.name for t in m.tasks] == ["label"]
    finally:
        MODELS.pop("tiny_for_test", None)


# --------------------------------------------------------------------------- gradients


def test_backward_grads_reach_mlps_and_only_looked_up_rows():
    model = _build()
    dense = torch.randn(4, D)
    labels = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    out = model(dense, _kjt(BAGS))
    loss, _ = model.loss(out, labels, torch.ones(4))
    loss.backward()
    for mlp in (model.dense_arch, model.over_arch):
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                assert layer.weight.grad is not None
                assert torch.isfinite(layer.weight.grad).all()
                assert layer.weight.grad.abs().sum() > 0
    bags = model.sparse_arch.embedding_bag_collection.embedding_bags
    for f in FEATURES:
        grad = bags[f"t_{f}"].weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        used = sorted({i for bag in BAGS[f] for i in bag})
        unused = [i for i in range(SIZES[f]) if i not in used]
        assert (grad[used].abs().sum(dim=1) > 0).all(), f
        assert (grad[unused] == 0).all(), f


# --------------------------------------------------------------------------- arches


@pytest.mark.parametrize("num_sparse", [1, 3, 26])
def test_dot_interaction_output_dim(num_sparse):
    dim = 5
    inter = DotInteraction(num_sparse)
    out = inter(torch.randn(2, dim), torch.randn(2, num_sparse, dim))
    expected = dim + num_sparse * (num_sparse + 1) // 2
    assert DotInteraction.output_dim(num_sparse, dim) == expected
    assert out.shape == (2, expected)


def test_dot_interaction_values_are_pairwise_dots():
    B, Fn, dim = 3, 4, 5
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(B, dim, generator=g, dtype=torch.float64)
    sparse = torch.randn(B, Fn, dim, generator=g, dtype=torch.float64)
    out = DotInteraction(Fn)(dense, sparse)
    vectors = [dense] + [sparse[:, k] for k in range(Fn)]
    expected = [dense]
    for i, j in itertools.combinations(range(Fn + 1), 2):  # (0,1), (0,2), ..., (F-1,F)
        expected.append((vectors[i] * vectors[j]).sum(dim=1, keepdim=True))
    torch.testing.assert_close(out, torch.cat(expected, dim=1))


def test_dot_interaction_training_path_matches_plain_autograd():
    """With gradients the interaction runs its own backward (one bmm through a symmetric
    matrix); values and gradients must equal plain autograd through bmm + indexing."""
    B, Fn, dim = 4, 6, 3
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(B, dim, generator=g, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(B, Fn, dim, generator=g, dtype=torch.float64, requires_grad=True)
    inter = DotInteraction(Fn)
    assert torch.autograd.gradcheck(inter, (dense, sparse))

    def plain(d, s):
        stacked = torch.cat([d.unsqueeze(1), s], dim=1)
        rows, cols = torch.triu_indices(Fn + 1, Fn + 1, offset=1)
        return torch.cat([d, torch.bmm(stacked, stacked.transpose(1, 2))[:, rows, cols]], dim=1)

    upstream = torch.randn(B, DotInteraction.output_dim(Fn, dim), generator=g, dtype=torch.float64)
    fast_out = inter(dense, sparse)
    fast = torch.autograd.grad(fast_out, (dense, sparse), upstream)
    ref_out = plain(dense, sparse)
    ref = torch.autograd.grad(ref_out, (dense, sparse), upstream)
    torch.testing.assert_close(fast_out, ref_out)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want)


def test_dot_interaction_under_bf16_autocast_follows_fp32():
    B, Fn, dim = 64, 8, 16
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(B, dim, generator=g, requires_grad=True)
    sparse = torch.randn(B, Fn, dim, generator=g, requires_grad=True)
    inter = DotInteraction(Fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = inter(dense.bfloat16(), sparse.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    want_out = inter(dense, sparse)
    want = torch.autograd.grad(want_out.square().sum(), (dense, sparse))
    torch.testing.assert_close(out.float(), want_out, rtol=0.05, atol=0.1)
    for got, ref in zip((dense.grad, sparse.grad), want):
        assert ((got - ref).norm() / ref.norm()).item() < 0.05


def _keyed(order: list[str], dims: dict[str, int], batch: int = 3) -> tuple[KeyedTensor, dict[str, torch.Tensor]]:
    parts = {f: torch.randn(batch, dims[f], requires_grad=True) for f in order}
    kt = KeyedTensor.from_tensor_list(order, [parts[f] for f in order])
    return kt, parts


def test_pooled_in_order_is_the_collections_buffer_when_ordered():
    names = ["a", "b", "c"]
    kt, _ = _keyed(names, dict.fromkeys(names, 4))
    out = pooled_in_order(kt, names)
    assert out.data_ptr() == kt.values().data_ptr() and out.shape == (3, 12)


@pytest.mark.parametrize("dims", [{"a": 4, "b": 4, "c": 4}, {"a": 2, "b": 5, "c": 3}])
def test_pooled_in_order_reorders_a_sharded_layout(dims):
    """A sharded collection groups its features by sharding type and rank; the model reads them
    in its own order, with gradients back to each feature."""
    kt, parts = _keyed(["c", "a", "b"], dims)
    out = pooled_in_order(kt, ["a", "b", "c"])
    torch.testing.assert_close(out, torch.cat([parts["a"], parts["b"], parts["c"]], dim=1))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    start = 0
    for f in ("a", "b", "c"):
        torch.testing.assert_close(parts[f].grad, weights[:, start:start + dims[f]])
        start += dims[f]


def test_a_reordering_gradient_is_the_inverse_gather():
    """A permutation's backward gathers with the inverse permutation (no zero-filled buffer and
    scatter-add): the node is the permutation's own, and the gradients equal index_select's."""
    kt, parts = _keyed(["c", "a", "b"], dict.fromkeys("abc", 4))
    out = pooled_in_order(kt, ["b", "c", "a"])
    assert type(out.grad_fn).__name__ != "IndexSelectBackward0"
    assert "PermuteColumns" in type(out.grad_fn.next_functions[0][0]).__name__
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    reference = {f: p.detach().clone().requires_grad_() for f, p in parts.items()}
    flat = torch.cat([reference[f] for f in ("c", "a", "b")], dim=1).reshape(3, 3, 4)
    (flat.index_select(1, torch.tensor([2, 0, 1])).reshape(3, 12) * weights).sum().backward()
    for f in "abc":
        torch.testing.assert_close(parts[f].grad, reference[f].grad, rtol=0, atol=0)


def test_reading_some_of_the_features_leaves_the_rest_without_gradient():
    """Not a permutation (a tower reads some of the collection's features): plain index_select,
    zero gradient to the features not read."""
    kt, parts = _keyed(["c", "a", "b"], dict.fromkeys("abc", 4))
    out = pooled_in_order(kt, ["b", "a"])
    torch.testing.assert_close(out, torch.cat([parts["b"], parts["a"]], dim=1))
    out.sum().backward()
    assert torch.equal(parts["c"].grad, torch.zeros(3, 4)) and torch.equal(parts["a"].grad, torch.ones(3, 4))


def test_mlp_layers():
    mlp = MLP(3, [5, 2])
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    mlp = MLP(3, [5, 2], last_linear=True)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (3, 5, 2)


def _cpu_ebc(pooling: PoolingType = PoolingType.SUM) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=E, num_embeddings=SIZES[f], feature_names=[f], pooling=pooling)
        for f in FEATURES
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    torch.manual_seed(1)
    for p in ebc.parameters():
        nn.init.uniform_(p, -1.0, 1.0)
    return ebc


def test_sparse_arch_pools_by_name_and_follows_feature_order():
    ebc = _cpu_ebc()
    kjt = _kjt(BAGS)
    base = SparseArch(ebc, FEATURES)(kjt)
    assert base.shape == (4, 3, E)
    # explicit sum pooling from the weights
    with torch.no_grad():
        for k, f in enumerate(FEATURES):
            w = ebc.embedding_bags[f"t_{f}"].weight
            for b, bag in enumerate(BAGS[f]):
                want = w[bag].sum(dim=0) if bag else torch.zeros(E)
                torch.testing.assert_close(base[b, k], want)
    for perm in itertools.permutations(range(3)):
        names = [FEATURES[i] for i in perm]
        out = SparseArch(ebc, names)(kjt)
        for k, i in enumerate(perm):
            torch.testing.assert_close(out[:, k], base[:, i])


def test_sparse_arch_mean_pooling():
    ebc = _cpu_ebc(PoolingType.MEAN)
    out = SparseArch(ebc, FEATURES)(_kjt(BAGS))
    w = ebc.embedding_bags["t_f_c"].weight.detach()
    torch.testing.assert_close(out[0, 2], (w[4] + w[0]) / 2)
    torch.testing.assert_close(out[1, 2], torch.zeros(E))  # empty bag


# --------------------------------------------------------------------------- loss


class _Heads(RecModel):
    """Outputs given as [B, T] in task order, as a model's heads would produce them."""

    def loss_of(self, out: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.loss(self.split_heads(out), labels, weights)[0]


def _bce(logit: float, y: float) -> float:
    p = 1.0 / (1.0 + np.exp(-logit))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_loss_is_weighted_mean_bce():
    m = _Heads([BinaryTask("label", 0)])
    logits = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    got = m.loss_of(logits, labels, torch.ones(3, dtype=torch.float64)).item()
    want = np.mean([_bce(0.3, 1), _bce(-1.2, 0), _bce(2.0, 0)])
    assert got == pytest.approx(want, rel=1e-12)


def test_loss_ignores_weight_zero_rows():
    m = _Heads([BinaryTask("click", 0), BinaryTask("buy", 1)])
    g = torch.Generator().manual_seed(3)
    real_out = torch.randn(5, 2, generator=g)
    real_y = torch.randint(0, 2, (5, 2), generator=g).float()
    pad_out = torch.randn(3, 2, generator=g) * 10
    pad_y = torch.ones(3, 2)
    real = m.loss_of(real_out, real_y, torch.ones(5))
    padded = m.loss_of(torch.cat([real_out, pad_out]), torch.cat([real_y, pad_y]),
                       torch.cat([torch.ones(5), torch.zeros(3)]))
    torch.testing.assert_close(padded, real)
    # summed over tasks, each a mean over the real rows
    want = sum(np.mean([_bce(real_out[i, t].item(), real_y[i, t].item()) for i in range(5)]) for t in range(2))
    assert real.item() == pytest.approx(want, rel=1e-5)


def test_loss_all_padding_is_zero_and_label_index_respected():
    m = _Heads([BinaryTask("b", 1)])
    out = torch.tensor([[0.5], [-0.5]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert m.loss_of(out, labels, torch.zeros(2)).item() == 0.0
    want = (_bce(0.5, 1.0) + _bce(-0.5, 0.0)) / 2
    assert m.loss_of(out, labels, torch.ones(2)).item() == pytest.approx(want, rel=1e-5)


def test_regression_task_mse_and_predictions():
    m = _Heads([BinaryTask("p", 0), RegressionTask("v", 1)])
    out = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    total, per_task = m.loss(m.split_heads(out), labels, torch.tensor([1.0, 1.0]))
    bce = (_bce(0.0, 1.0) + _bce(1.0, 0.0)) / 2
    mse = ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2
    assert total.item() == pytest.approx(bce + mse, rel=1e-5)
    assert per_task.tolist() == pytest.approx([bce, mse], rel=1e-5)
    pred = m.predictions(m.split_heads(out))
    torch.testing.assert_close(pred["p"], torch.tensor([0.5, 1 / (1 + np.exp(-1.0))], dtype=torch.float32))
    torch.testing.assert_close(pred["v"], torch.tensor([2.0, -1.0]))


def test_task_weights_scale_the_total_but_not_the_task_losses():
    m = _Heads([BinaryTask("p", 0, weight=0.25), RegressionTask("v", 1, weight=3.0, loss="huber", huber_delta=1.0)])
    out = torch.tensor([[0.0, 4.0], [1.0, 1.5]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    total, per_task = m.loss(m.split_heads(out), labels, torch.ones(2))
    bce = (_bce(0.0, 1.0) + _bce(1.0, 0.0)) / 2
    huber = ((3.0 - 0.5) + 0.5 * 0.5 ** 2) / 2  # |err| = 3 (linear part), 0.5 (quadratic part)
    assert per_task.tolist() == pytest.approx([bce, huber], rel=1e-5)
    assert total.item() == pytest.approx(0.25 * bce + 3.0 * huber, rel=1e-5)


def test_loss_gradient_zero_on_padding_rows():
    m = _Heads([BinaryTask("label", 0)])
    out = torch.randn(4, 1, requires_grad=True)
    m.loss_of(out, torch.ones(4, 1), torch.tensor([1.0, 1.0, 0.0, 0.0])).backward()
    assert (out.grad[2:] == 0).all()
    assert (out.grad[:2] != 0).all()
    expected = (torch.sigmoid(out.detach()[:2]) - 1.0) / 2  # d/dx mean BCE over 2 rows
    torch.testing.assert_close(out.grad[:2], expected)
