"""What changed between the config a checkpoint was written with and the one in use now.

Resuming a run with other hyper-parameters, or evaluating a checkpoint with another id policy
or table shape, silently gives another run's numbers; both are refused with a one-line diff
unless the keys are ones that may change (``MAY_CHANGE_ON_RESUME``) or the user forces it.
"""

from __future__ import annotations

from typing import Any

# Keys (or section prefixes) that may differ on resume without changing what the run means:
# how long it goes on, how often it evaluates/logs/saves, where eval data lives, logging.
MAY_CHANGE_ON_RESUME = (
    "train.epochs", "train.max_steps", "train.stop_at_step", "train.log_every", "train.device",
    "train.max_skipped_steps", "train.keep_freed_memory", "train.release_freed_memory_every",
    "eval.", "logging.", "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.resume", "checkpoint.async_save", "checkpoint.at_end", "data.eval_path", "data.eval_batch_size",
    "data.prefetch_factor", "data.num_workers", "sharding.", "precision.comms",
)

# What evaluation needs to read a checkpoint the way it was trained: the model and its inputs.
MUST_MATCH_FOR_EVAL = (
    "model.", "data.label_columns", "data.dense_columns", "data.sparse_columns", "data.weight_columns",
    "data.id_policy", "data.dense_transform", "data.dense_missing", "data.max_list_length", "data.list_overflow",
)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "t": [{"n": 2}]} -> {"a.b": 1, "t[0].n": 2}: the dotted keys of errors."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{dotted}[{i}]."))
        else:
            flat[dotted] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    # "data.weight_columns" also covers its entries ("data.weight_columns.cat_0"), as "eval." does.
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") or key.startswith(p + "[")
               for p in patterns)


def _with_added_sections(saved: dict) -> dict:
    """A config saved before a section existed reads as that section's defaults (`precision`:
    fp32 everywhere, what every run was before it), so old checkpoints still resume."""
    from dataclasses import asdict

    from trainer.config import PrecisionConfig

    return {"precision": asdict(PrecisionConfig()), **saved}


def changed(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: {key: (saved, current)}.

    A field that rectrain added after the checkpoint was written (absent from a section that the
    saved config has, e.g. a new `data.*` option or a task's `top_k`) is not a change: the run
    was trained with that field's behaviour of the time. A whole new entry (another task, table
    or weight column) still is."""
    a, b = flatten(_with_added_sections(saved)), flatten(current)

    def new_field(key: str) -> bool:
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return (key not in a and bool(parent) and any(k.startswith(parent) for k in a)
                and b.get(key) == field_default(key))

    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not new_field(k)}


_NO_DEFAULT = object()


def field_default(key: str) -> Any:
    """The default of the typed config field a dotted key names (`data.max_list_length`,
    `model.tasks[0].top_k`); a sentinel for keys inside maps or untyped sections (a table's
    sharding, a weight column, `model.arch`), which are never taken for new fields."""
    import dataclasses
    import re
    import typing

    from trainer.config import RunConfig

    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        match = re.fullmatch(r"([A-Za-z_]\w*)(\[\d+\])?", part)
        if not match or not dataclasses.is_dataclass(cls):
            return _NO_DEFAULT
        name, indexed = match.groups()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return _NO_DEFAULT
        hint = typing.get_type_hints(cls)[name]
        if indexed:  # an entry of a list of typed sections, e.g. model.tasks[0]
            args = typing.get_args(hint)
            if not args:
                return _NO_DEFAULT
            cls = args[0]
            continue
        if i == len(parts) - 1:
            f = fields[name]
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else _NO_DEFAULT
        cls = hint
    return _NO_DEFAULT


def resume_conflicts(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Changes that alter the run's meaning (not in MAY_CHANGE_ON_RESUME)."""
    return {k: v for k, v in changed(saved, current).items() if not _matches(k, MAY_CHANGE_ON_RESUME)}


def eval_conflicts(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Changes that make evaluation read the checkpoint differently from how it was trained."""
    return {k: v for k, v in changed(saved, current).items() if _matches(k, MUST_MATCH_FOR_EVAL)}


def describe(conflicts: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """`key: old -> new; ...` on one line (long values shortened)."""

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in list(conflicts.items())[:limit]]
    more = len(conflicts) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
