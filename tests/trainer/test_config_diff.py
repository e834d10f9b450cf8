"""trainer/config_diff.py: dotted keys of what changed, and which changes matter when."""

from __future__ import annotations

from trainer.config import load_config
from trainer.config_diff import changed, describe, eval_conflicts, flatten, resume_conflicts

BASE = "configs/dlrm_debug.toml"


def test_flatten_indexes_lists_of_tables():
    flat = flatten({"model": {"tables": [{"name": "a", "pooling": "sum"}], "arch": {"x": [1, 2]}}, "z": {}})
    assert flat == {"model.tables[0].name": "a", "model.tables[0].pooling": "sum", "model.arch.x": [1, 2], "z": {}}


def test_pooling_change_is_an_eval_conflict_and_epochs_is_not():
    a = load_config(BASE).to_dict()
    b = load_config(BASE, ["train.epochs=3", "eval.max_batches=2"]).to_dict()
    b["model"]["tables"][1]["pooling"] = "mean"
    assert set(changed(a, b)) == {"train.epochs", "eval.max_batches", "model.tables[1].pooling"}
    assert set(eval_conflicts(a, b)) == {"model.tables[1].pooling"}
    assert set(resume_conflicts(a, b)) == {"model.tables[1].pooling"}
    assert describe(eval_conflicts(a, b)) == "model.tables[1].pooling: 'sum' -> 'mean'"


def test_describe_stays_one_line_and_short():
    conflicts = {f"k{i}": ("x" * 100, i) for i in range(9)}
    text = describe(conflicts)
    assert "\n" not in text and text.endswith("and 3 more") and len(text) < 600


def test_fields_added_since_the_checkpoint_are_not_changes_but_new_entries_are():
    current = load_config(BASE).to_dict()
    old = load_config(BASE).to_dict()
    del old["data"]["max_list_length"]  # options rectrain gained after this checkpoint was written
    del old["model"]["tasks"][0]["top_k"]
    assert changed(old, current) == {}
    assert eval_conflicts(old, current) == {} and resume_conflicts(old, current) == {}
    grown = load_config(BASE).to_dict()
    grown["model"]["tasks"].append(dict(grown["model"]["tasks"][0], name="extra"))
    assert "model.tasks[1].name" in eval_conflicts(old, grown)  # a whole new task is still a change
    grown = load_config(BASE).to_dict()
    grown["data"]["weight_columns"] = {"cat_0": "w0"}
    assert "data.weight_columns" in eval_conflicts(current, grown)
    more = load_config(BASE).to_dict()
    more["data"]["weight_columns"] = {"cat_0": "w0", "cat_1": "w1"}
    assert "data.weight_columns.cat_1" in eval_conflicts(grown, more)  # a new entry of a map is a change
    # a field missing from the old config but set to something other than its default is a change
    assert "data.max_list_length" not in changed(old, current)
    changed_cap = load_config(BASE, ["data.max_list_length=7"]).to_dict()
    assert "data.max_list_length" in eval_conflicts(old, changed_cap)


def test_field_defaults_follow_the_typed_config():
    from trainer.config_diff import _NO_DEFAULT, field_default

    assert field_default("data.max_list_length") == 10_000
    assert field_default("model.tasks[3].top_k") == [10, 50, 100]
    assert field_default("data.weight_columns.cat_0") is _NO_DEFAULT
    assert field_default("model.arch.low_rank") is _NO_DEFAULT
