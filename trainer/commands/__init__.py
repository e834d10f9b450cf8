"""One file per `rectrain` verb: each has `add_parser(sub)` and `run(args) -> int`."""

from trainer.commands import bench, data, demo, eval, export, launch, plan, retrieve, score, train

COMMANDS = {"data": data, "train": train, "eval": eval, "plan": plan, "launch": launch, "demo": demo,
            "export": export, "retrieve": retrieve, "score": score, "bench": bench}
