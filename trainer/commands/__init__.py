"""One file per `rectrain` verb: each has `add_parser(sub)` and `run(args) -> int`."""

from trainer.commands import data, demo, eval, launch, plan, train

COMMANDS = {"data": data, "train": train, "eval": eval, "plan": plan, "launch": launch, "demo": demo}
