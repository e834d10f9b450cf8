"""Train every registered model on 2 CPU ranks (torchrun) on the synthetic logs and on MovieLens,
and print one table: test AUC (and MSE for regression tasks), samples/s and wall time.

    .venv/bin/python scripts/zoo_report.py [--rows 60000] [--nproc 2] [--out runs/zoo]

Single-task models run MovieLens as click prediction: the script takes the data, tables and
training settings of configs/mmoe_movielens.toml and the model section (name, arch, feature
groups re-pointed at the MovieLens features) of the model's own synthetic config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MOVIELENS = ROOT.parent / "shared" / "data" / "movielens-latest-small"

SYNTH = {  # model -> (its synthetic config, the synthetic schema it reads)
    "dlrm": ("dlrm_synth.toml", "criteo"),
    "dcn_v2": ("dcn_v2_synth.toml", "criteo"),
    "dlrm_dcnv2": ("dlrm_dcnv2_synth.toml", "criteo"),
    "deepfm": ("deepfm_synth.toml", "criteo"),
    "wide_deep": ("wide_deep_synth.toml", "criteo"),
    "shared_bottom": ("shared_bottom_synth.toml", "multitask"),
    "mmoe": ("mmoe_synth.toml", "multitask"),
    "ple": ("ple_synth.toml", "multitask"),
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def dump_toml(raw: dict) -> str:
    """Enough TOML for configs: every section as a table, arrays of tables as inline tables."""
    lines = []
    for section, body in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def movielens_config(model: str, out: Path) -> Path:
    """The model's shipped MovieLens config, or one composed from mmoe_movielens.toml's data and
    training settings and the model section of the model's synthetic config."""
    shipped = ROOT / "configs" / f"{model}_movielens.toml"
    if shipped.is_file():
        return shipped
    base = tomllib.loads((ROOT / "configs" / "mmoe_movielens.toml").read_text())
    own = tomllib.loads((ROOT / "configs" / SYNTH[model][0]).read_text())["model"]
    section = {**base["model"], "name": own["name"], "arch": own.get("arch", {})}
    if SYNTH[model][1] == "criteo":  # a single-task model: click only
        section["tasks"] = [t for t in base["model"]["tasks"] if t["name"] == "click"]
    if own.get("feature_groups"):  # e.g. Wide&Deep: every MovieLens feature in each group
        section["feature_groups"] = {g: base["data"]["sparse_columns"] for g in own["feature_groups"]}
    base["model"] = section
    path = out / f"{model}_movielens.toml"
    path.write_text(dump_toml(base))
    return path


def train(config: Path, train_path: Path, eval_path: Path, run: Path, nproc: int) -> tuple[dict, float, float]:
    sets = {"data.train_path": str(train_path), "data.eval_path": str(eval_path), "train.run_dir": str(run),
            "logging.progress_bar": False, "checkpoint.every_steps": 0}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer", "train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rates = [r["samples_per_sec"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("prefix") == "train" and "samples_per_sec" in r]
    return result, sum(rates[1:]) / max(len(rates) - 1, 1), wall  # the first window includes start-up


def summarize(result: dict) -> str:
    tasks = result.get("tasks") or {"": result}  # a single-task result keeps its metrics at the top
    parts = []
    for name, m in tasks.items():
        parts.append(f"{name} AUC {m['auc']:.3f}".strip() if "auc" in m else
                     f"{name} MSE {m['mse']:.3f} (var {m['label_variance']:.3f})")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="runs/zoo")
    parser.add_argument("--models", nargs="*", default=list(SYNTH))
    args = parser.parse_args()
    from data.movielens import convert_movielens
    from data.synth import write_synthetic

    out = Path(args.out).resolve()
    data = {}
    for schema in ("criteo", "multitask"):
        d = out / "data" / schema
        if not (d / "train").exists():
            write_synthetic(d / "train", args.rows, seed=0, files=3, row_group_rows=4096, schema=schema)
            write_synthetic(d / "eval", max(args.rows // 7, 1000), seed=1, files=1, row_group_rows=4096, schema=schema)
        data[schema] = d
    ml = out / "data" / "movielens"
    if MOVIELENS.is_dir() and not (ml / "train").exists():
        convert_movielens(MOVIELENS, ml)
    rows = []
    for model in args.models:
        config, schema = SYNTH[model]
        res, rate, wall = train(ROOT / "configs" / config, data[schema] / "train", data[schema] / "eval",
                                out / "runs" / f"{model}_synth", args.nproc)
        row = {"model": model, "synth": summarize(res), "synth_samples_per_s": round(rate), "synth_wall_s": round(wall)}
        if (ml / "train").exists():
            res, rate, wall = train(movielens_config(model, out), ml / "train", ml / "eval",
                                    out / "runs" / f"{model}_movielens", args.nproc)
            row.update(movielens=summarize(res), movielens_samples_per_s=round(rate), movielens_wall_s=round(wall))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | synthetic (test) | samples/s | wall s | MovieLens (test) | samples/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['synth']} | {r['synth_samples_per_s']} | {r['synth_wall_s']} | "
              f"{r.get('movielens', '-')} | {r.get('movielens_samples_per_s', '-')} | {r.get('movielens_wall_s', '-')} |")


if __name__ == "__main__":
    main()
