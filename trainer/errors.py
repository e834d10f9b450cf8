"""Errors the user can act on."""

from __future__ import annotations


class RunError(RuntimeError):
    """A failure at run time that the user can fix (a full disk, a read-only directory, a model
    that diverged): the message is one line naming what failed and how to fix it. The CLI prints
    it as ``rectrain: error: <message>`` and exits with status 2, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
