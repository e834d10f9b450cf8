"""`rectrain train`: one process, or N workers under torchrun (same code path)."""

from __future__ import annotations

import json

from trainer.commands.common import add_config_args
from trainer.config import load_config


def add_parser(sub) -> None:
    add_config_args(sub.add_parser("train", help="train (one process, or N under torchrun)"))


def _fit(cfg) -> None:
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    result = trainer.fit()
    if trainer.ctx.is_main:
        print(json.dumps(result))


def run(args) -> int:
    from trainer.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    try:
        _fit(cfg)  # the Trainer (and the process group it holds) is unreferenced once this returns
    finally:
        shutdown()
    return 0
