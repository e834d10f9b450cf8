"""The `rectrain` command line (also `python -m trainer`): lists the commands (one file each in
trainer/commands/) and owns the one error handler, so every user-facing error is one line and
exit code 2. Under `rectrain launch` the handler also leaves a record for the launcher, which
then stops all workers instead of letting torchrun retry an error that would only repeat."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.commands import COMMANDS
from trainer.commands.launch import record_error
from trainer.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectrain", description="Distributed recommendation-model training on TorchRec")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from data.schema import DataError
    from models.registry import ArchConfigError
    from trainer.errors import RunError
    from trainer.logger import setup_console

    args = build_parser().parse_args(argv)
    setup_console(int(os.environ.get("RANK", "0")))
    try:
        return COMMANDS[args.command].run(args)
    except (ConfigError, ArchConfigError, DataError, FileNotFoundError, RunError) as e:
        record_error(e)
        print(f"rectrain: error: {e}", file=sys.stderr)
        return 2
