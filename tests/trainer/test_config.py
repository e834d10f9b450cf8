"""trainer/config.py: loading the shipped TOMLs, `--set` overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, TableSharding, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


MINIMAL = """
[data]
dense_columns = ["d0"]
sparse_columns = ["a", "b"]

[model]
embedding_dim = 8

[model.arch]
dense_arch = [8]
over_arch = [4]

[[model.tables]]
name = "ta"
features = ["a"]
num_embeddings = 10

[[model.tables]]
name = "tb"
features = ["b"]
num_embeddings = 20
embedding_dim = 4
"""


# --------------------------------------------------------------------------- shipped configs


def test_synth_config_loads():
    cfg = load_config(CONFIGS / "dlrm_synth.toml")
    assert isinstance(cfg, RunConfig)
    assert cfg.data.sparse_columns == [f"cat_{i}" for i in range(26)]
    assert cfg.data.dense_columns == [f"dense_{i}" for i in range(13)]
    assert len(cfg.model.tables) == 26
    assert cfg.model.feature_names == [f"cat_{i}" for i in range(26)]
    assert all(t.embedding_dim == cfg.model.embedding_dim == 16 for t in cfg.model.tables)
    assert cfg.sharding.default_type == "table_wise"
    assert cfg.sharding.type_for("t_cat_2") == "column_wise"
    assert cfg.sharding.type_for("t_cat_8") == "data_parallel"
    assert cfg.sharding.type_for("t_cat_0") == "table_wise"  # falls back to default_type
    assert cfg.optimizer.decay == "cosine"
    assert cfg.optimizer.min_lr_ratio == pytest.approx(0.1)
    assert isinstance(cfg.optimizer.grad_clip_norm, float)
    assert cfg.checkpoint_dir == Path("runs/demo") / "checkpoints"
    assert cfg.log_dir == Path("runs/demo") / "tb"


def test_debug_config_loads():
    cfg = load_config(CONFIGS / "dlrm_debug.toml")
    assert cfg.data.sparse_columns == ["cat_0", "cat_1", "cat_5", "cat_23"]
    assert [t.name for t in cfg.model.tables] == ["t_cat_0", "t_cat_1", "t_cat_5", "t_cat_23"]
    assert [t.num_embeddings for t in cfg.model.tables] == [1460, 583, 24, 2860]
    # label_columns is not in the file: the dataclass default applies
    assert cfg.data.label_columns == ["label"]
    assert cfg.model.embedding_dim == 8
    assert all(t.embedding_dim == 8 for t in cfg.model.tables)
    assert cfg.train.device == "cpu"
    assert cfg.data.num_workers == 0


def test_criteo_config_loads():
    cfg = load_config(CONFIGS / "dlrm_criteo.toml")
    assert len(cfg.model.tables) == 26
    assert len({t.name for t in cfg.model.tables}) == 26
    assert cfg.model.embedding_dim == 128
    assert all(t.embedding_dim == 128 for t in cfg.model.tables)
    assert cfg.model.arch.dense_arch[-1] == 128
    sizes = {t.name: t.num_embeddings for t in cfg.model.tables}
    assert sizes["t_cat_0"] == 45833188
    assert sizes["t_cat_5"] == 3
    assert cfg.sharding.hbm_cap_gb == pytest.approx(70.0)
    assert cfg.sharding.type_for("t_cat_19") == "row_wise"
    assert cfg.sharding.type_for("t_cat_1") == ""  # left to the planner
    assert cfg.data.batch_size == 16384


def test_to_dict_roundtrip_has_every_section():
    cfg = load_config(CONFIGS / "dlrm_debug.toml")
    d = cfg.to_dict()
    assert set(d) == {"data", "model", "sharding", "optimizer", "precision", "train", "eval", "checkpoint",
                      "logging"}
    assert d["model"]["tables"][3]["features"] == ["cat_23"]


# --------------------------------------------------------------------------- overrides


def test_overrides_take_effect_with_right_types():
    cfg = load_config(
        CONFIGS / "dlrm_synth.toml",
        ["train.epochs=3", "sharding.tables.t_cat_0.type=column_wise", 'data.train_path="x"',
         "optimizer.dense_lr=1", "logging.tensorboard=false", "model.arch.dense_arch=[32, 16]"],
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert isinstance(cfg.sharding.tables["t_cat_0"], TableSharding)
    assert cfg.sharding.tables["t_cat_0"].type == "column_wise"
    assert cfg.sharding.type_for("t_cat_0") == "column_wise"
    # entries from the file are kept next to the new one
    assert cfg.sharding.tables["t_cat_2"].type == "column_wise"
    assert cfg.data.train_path == "x"
    # an int literal for a float field becomes a float
    assert cfg.optimizer.dense_lr == 1.0 and type(cfg.optimizer.dense_lr) is float
    assert cfg.logging.tensorboard is False
    assert cfg.model.arch.dense_arch == [32, 16]


def test_override_bare_word_is_a_string():
    cfg = load_config(CONFIGS / "dlrm_debug.toml", ["data.id_policy=hash", "train.run_dir=runs/x"])
    assert cfg.data.id_policy == "hash"
    assert cfg.train.run_dir == "runs/x"
    assert cfg.checkpoint_dir == Path("runs/x/checkpoints")


def test_override_without_equals_is_config_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(CONFIGS / "dlrm_debug.toml", ["train.epochs"])


def test_override_without_file():
    cfg = load_config(None, ["data.sparse_columns=[\"a\"]", "model.tables=[{name=\"t\", features=[\"a\"], num_embeddings=5}]"])
    assert cfg.model.tables[0].embedding_dim == cfg.model.embedding_dim == 16


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=2", "train.epoch"),
        ("data.batchsize=2", "data.batchsize"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_unknown_key_names_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "dlrm_debug.toml", [override])
    assert f"'{key}'" in str(e.value)
    assert "unknown key" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ('train.epochs="two"', "train.epochs"),
        ("train.epochs=two", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # bools are not ints
        ("optimizer.dense_lr=fast", "optimizer.dense_lr"),
        ("data.dense_columns=3", "data.dense_columns"),
        ("data.batch_size=1.5", "data.batch_size"),
    ],
)
def test_wrong_type_names_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "dlrm_debug.toml", [override])
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize(
    "override, key, choice",
    [
        ("data.id_policy=foo", "data.id_policy", "modulo"),
        ("optimizer.decay=exp", "optimizer.decay", "cosine"),
        ("sharding.default_type=diagonal", "sharding.default_type", "row_wise"),
        ("sharding.tables.t_cat_0.type=diagonal", "sharding.tables.t_cat_0.type", "column_wise"),
        ("train.device=tpu", "train.device", "cuda"),
    ],
)
def test_bad_enum_names_key_and_choices(override, key, choice):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "dlrm_debug.toml", [override])
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert choice in msg  # lists the valid values


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("optimizer.min_lr_ratio=1.5", "optimizer.min_lr_ratio"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("model.embedding_dim=0", "model.embedding_dim"),
        ("train.release_freed_memory_every=-1", "train.release_freed_memory_every"),
    ],
)
def test_out_of_range_values(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "dlrm_debug.toml", [override])
    assert f"'{key}'" in str(e.value)


def test_data_parallel_with_non_dense_kernel_rejected():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "dlrm_debug.toml",
                    ["sharding.tables.t_cat_0.type=data_parallel", "sharding.tables.t_cat_0.kernel=fused"])
    assert "'sharding.tables.t_cat_0.kernel'" in str(e.value)


def test_feature_not_in_sparse_columns(tmp_path):
    p = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_config(p, ['data.sparse_columns=["a"]'])
    msg = str(e.value)
    assert "'model.tables[1].features'" in msg
    assert "'b'" in msg
    assert "data.sparse_columns" in msg
    assert str(p) in msg  # errors from a file name the file


def test_sharding_entry_for_unknown_table(tmp_path):
    p = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["sharding.tables.t_nope.type=row_wise"])
    msg = str(e.value)
    assert "'sharding.tables.t_nope'" in msg
    assert "ta" in msg and "tb" in msg


def test_duplicate_table_names(tmp_path):
    text = MINIMAL.replace('name = "tb"', 'name = "ta"')
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'model.tables'" in msg
    assert "['ta']" in msg


def test_feature_mapped_to_two_tables(tmp_path):
    text = MINIMAL.replace('features = ["b"]', 'features = ["a"]')
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"'model.tables'.*\['a'\]"):
        load_config(p)


def test_column_in_two_roles(tmp_path):
    p = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"'data'.*\['a'\]"):
        load_config(p, ['data.dense_columns=["a"]'])


def test_table_field_error_names_index(tmp_path):
    p = _write(tmp_path, MINIMAL)
    bad = MINIMAL.replace("num_embeddings = 20", "num_embeddings = 0")
    p.write_text(bad)
    with pytest.raises(ConfigError, match=r"'model.tables\[1\].num_embeddings'"):
        load_config(p)
    p.write_text(MINIMAL.replace('embedding_dim = 4', 'pooling = "max"'))
    with pytest.raises(ConfigError, match=r"'model.tables\[1\].pooling'"):
        load_config(p)
    p.write_text(MINIMAL.replace('embedding_dim = 4', 'embeding_dim = 4'))
    with pytest.raises(ConfigError, match=r"'model.tables\[1\].embeding_dim'"):
        load_config(p)


def test_weight_column_for_unknown_feature(tmp_path):
    p = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"'data.weight_columns.zz'"):
        load_config(p, ['data.weight_columns.zz="w"'])
    cfg = load_config(p, ['data.weight_columns.a="wa"'])
    assert cfg.data.weight_columns == {"a": "wa"}


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert str(missing) in str(e.value)
    assert "does not exist" in str(e.value)


def test_invalid_toml(tmp_path):
    p = _write(tmp_path, "[data\nx = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_embedding_dim_zero_inherits_model_dim(tmp_path):
    p = _write(tmp_path, MINIMAL)
    cfg = load_config(p)
    assert [t.embedding_dim for t in cfg.model.tables] == [8, 4]  # ta: 0 -> 8; tb keeps 4
    cfg = load_config(p, ["model.embedding_dim=32"])
    assert [t.embedding_dim for t in cfg.model.tables] == [32, 4]


# --------------------------------------------------------------------------- model contract: arch, tasks, groups


def test_arch_is_the_models_typed_config():
    from models.dlrm import DLRMConfig

    cfg = load_config(CONFIGS / "dlrm_synth.toml")
    assert isinstance(cfg.model.arch, DLRMConfig)
    assert cfg.model.arch.dense_arch == [64, 16]
    assert cfg.to_dict()["model"]["arch"]["over_arch"] == [128, 64]


def test_old_arch_keys_say_where_they_moved(tmp_path):
    text = MINIMAL.replace("[model.arch]\n", "")
    with pytest.raises(ConfigError, match=r"'model\.dense_arch': moved to model\.arch\.dense_arch"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("assignment, key", [
    ("model.arch.dropout=1.5", "model.arch.dropout"),
    ("model.arch.dense_arch=[]", "model.arch.dense_arch"),
    ("model.arch.bogus=1", "model.arch.bogus"),
    ("model.arch.dense_arch=\"x\"", "model.arch.dense_arch"),
])
def test_arch_errors_name_the_dotted_key(tmp_path, assignment, key):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, MINIMAL), [assignment])
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_unknown_model_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'model\.name': unknown model 'nope'.*dlrm"):
        load_config(_write(tmp_path, MINIMAL), ["model.name=nope"])


def test_default_tasks_are_one_binary_task_per_label(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ['data.label_columns=["click", "buy"]'])
    assert [(t.name, t.label, t.kind, t.loss, t.weight) for t in cfg.model.tasks] == [
        ("click", "click", "binary", "bce", 1.0), ("buy", "buy", "binary", "bce", 1.0)]


def test_tasks_from_toml(tmp_path):
    text = MINIMAL + """
[[model.tasks]]
name = "click"
weight = 2.0

[[model.tasks]]
name = "stars"
label = "rating"
kind = "regression"
loss = "huber"
serving_weight = 0.1
"""
    cfg = load_config(_write(tmp_path, text), ['data.label_columns=["click", "rating"]'])
    click, stars = cfg.model.tasks
    assert (click.label, click.kind, click.loss, click.weight) == ("click", "binary", "bce", 2.0)
    assert (stars.label, stars.kind, stars.loss, stars.serving_weight) == ("rating", "regression", "huber", 0.1)


@pytest.mark.parametrize("task, key", [
    ('{name = "x", kind = "ranking"}', "model.tasks[0].kind"),
    ('{name = "label", loss = "huber"}', "model.tasks[0].loss"),
    ('{name = "x", label = "nope"}', "model.tasks[0].label"),
    ('{name = "label", weight = -1.0}', "model.tasks[0].weight"),
])
def test_task_errors(tmp_path, task, key):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, MINIMAL), [f"model.tasks=[{task}]"])
    assert f"'{key}'" in str(e.value)


def test_feature_groups_must_name_table_features(tmp_path):
    with pytest.raises(ConfigError, match=r"'model\.feature_groups\.wide'.*\['zz'\]"):
        load_config(_write(tmp_path, MINIMAL), ['model.feature_groups.wide=["a", "zz"]'])
    cfg = load_config(_write(tmp_path, MINIMAL), ['model.feature_groups.wide=["a"]'])
    assert cfg.model.feature_groups == {"wide": ["a"]}


def test_early_stopping_and_keep_best_need_a_metric(tmp_path):
    with pytest.raises(ConfigError, match=r"'eval\.patience'.*best_metric"):
        load_config(_write(tmp_path, MINIMAL), ["eval.patience=2", "eval.every_steps=10"])
    with pytest.raises(ConfigError, match=r"'eval\.patience'.*every_steps"):
        load_config(_write(tmp_path, MINIMAL), ["eval.patience=2", "eval.best_metric=auc"])
    with pytest.raises(ConfigError, match=r"'checkpoint\.keep_best'.*best_metric"):
        load_config(_write(tmp_path, MINIMAL), ["checkpoint.keep_best=true"])


def test_dense_missing_and_embedding_weight_decay(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["data.dense_missing=indicator",
                                                  "optimizer.embedding_weight_decay=1e-5"])
    assert cfg.data.dense_missing == "indicator" and cfg.optimizer.embedding_weight_decay == 1e-5
    with pytest.raises(ConfigError, match=r"'data\.dense_missing'"):
        load_config(_write(tmp_path, MINIMAL), ["data.dense_missing=mean"])
    with pytest.raises(ConfigError, match=r"'optimizer\.embedding_weight_decay'"):
        load_config(_write(tmp_path, MINIMAL), ["optimizer.embedding_weight_decay=-1"])


def test_sparse_column_without_a_table_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, MINIMAL), ['data.sparse_columns=["a", "b", "c"]'])
    msg = str(e.value)
    assert "'data.sparse_columns'" in msg and "['c']" in msg and "[[model.tables]]" in msg


@pytest.mark.parametrize("name", ["serving", "click.rate", "a/b", "with space"])
def test_task_names_that_would_break_metric_names(tmp_path, name):
    with pytest.raises(ConfigError, match=r"'model\.tasks\[0\]\.name'"):
        load_config(_write(tmp_path, MINIMAL), [f'model.tasks=[{{name = "{name}", label = "label"}}]'])


@pytest.mark.parametrize("assignment, key", [("eval.every_steps=10", "eval.every_steps"),
                                             ('eval.best_metric="auc"', "eval.best_metric")])
def test_periodic_eval_needs_eval_data(tmp_path, assignment, key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*data\.eval_path"):
        load_config(_write(tmp_path, MINIMAL), [assignment])


def test_multitask_needs_a_serving_weight(tmp_path):
    tasks = 'model.tasks=[{name = "y1", serving_weight = 0.0}, {name = "y2", serving_weight = 0.0}]'
    with pytest.raises(ConfigError, match=r"'model\.tasks'.*serving_weight"):
        load_config(_write(tmp_path, MINIMAL), ['data.label_columns=["y1", "y2"]', tasks])


def test_error_from_an_override_blames_the_override_not_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.epochs=0"])
    assert str(e.value).startswith("--set train.epochs=0: config key 'train.epochs'")
    bad = _write(tmp_path, MINIMAL.replace("embedding_dim = 8", "embedding_dim = 0"), "bad.toml")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.epochs=2"])
    assert str(e.value).startswith(f"{bad}: config key 'model.embedding_dim'")


# --------------------------------------------------------------------------- retrieval (two_tower)

TWO_TOWER = CONFIGS / "two_tower_synth.toml"


def test_two_tower_configs_load_with_one_retrieval_task():
    for name in ("two_tower_synth.toml", "two_tower_movielens.toml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.model.is_retrieval and cfg.data.label_columns == []
        (task,) = cfg.model.tasks
        assert (task.kind, task.loss, task.label, task.top_k) == ("retrieval", "sampled_softmax", "", [10, 50, 100])
        assert cfg.data.items_path.endswith("/items")
        assert (cfg.data.targets_column, cfg.data.seen_column, cfg.data.title_column) == ("targets", "seen", "title")
        assert [t.name for t in cfg.model.tables if t.features == ["history", "item_id"]] == ["t_item"]
        assert all(t.type in ("table_wise", "column_wise", "data_parallel") for t in cfg.sharding.tables.values())


def test_a_retrieval_model_without_tasks_gets_one_retrieval_task(tmp_path):
    text = TWO_TOWER.read_text().replace('[[model.tasks]]\nname = "retrieval"\nkind = "retrieval"\ntop_k = [10, 50, 100]\n', "")
    assert "[[model.tasks]]" not in text
    cfg = load_config(_write(tmp_path, text))
    assert [(t.name, t.kind) for t in cfg.model.tasks] == [("retrieval", "retrieval")]


@pytest.mark.parametrize("overrides, key, words", [
    (['model.tasks=[{name = "r", kind = "retrieval", top_k = [50, 10]}]'], "model.tasks[0].top_k", "increasing"),
    (['model.tasks=[{name = "r", kind = "retrieval", top_k = [0]}]'], "model.tasks[0].top_k", "positive"),
    (['model.tasks=[{name = "r", kind = "retrieval", label = "y"}]'], "model.tasks[0].label", "no label"),
    (['model.tasks=[{name = "r", kind = "retrieval", loss = "bce"}]'], "model.tasks[0].loss", "sampled_softmax"),
    (['model.tasks=[{name = "r", kind = "binary"}]'], "model.tasks[0].kind", "retrieval tasks only"),
    (['data.label_columns=["label"]'], "data.label_columns", "label_columns = []"),
    (['model.arch.extra_negatives=8', 'data.items_path=""', 'data.eval_path=""'], "data.items_path",
     "extra_negatives"),
    (['data.items_path=""'], "data.items_path", "full item catalog"),
    (['model.arch.query_features=["user_id", "nope"]'], "model.arch.query_features", "not looked up"),
    (['model.arch.query_features=["user_id"]'], "model.arch.query_features", "in no tower"),
    (['model.arch.query_features=["user_id", "history", "item_id"]'], "model.arch.candidate_features",
     "both towers"),
    (['model.arch.item_id_feature="category_x"'], "model.arch.item_id_feature", "not in candidate_features"),
    (['model.arch.learn_temperature=true', 'model.arch.temperature=5.0'], "model.arch.temperature", "learned"),
    (['model.arch.negative_sampler="zipf"'], "model.arch.negative_sampler", "uniform"),
])
def test_two_tower_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(TWO_TOWER, overrides)
    msg = str(e.value)
    assert f"config key '{key}'" in msg and words in msg and "\n" not in msg, msg


def test_a_ranking_model_refuses_a_retrieval_task_and_empty_labels(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"config key 'model.tasks\[0\].kind'.*retrieval model such as two_tower"):
        load_config(path, ['model.tasks=[{name = "r", kind = "retrieval"}]'])
    with pytest.raises(ConfigError, match=r"config key 'data.label_columns'.*at least one label column"):
        load_config(path, ["data.label_columns=[]"])
