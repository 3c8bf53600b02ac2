"""The ``editd`` command.

Every verb in ``docs/contracts.md`` ("The CLI verbs") is listed in ``editd --help``,
plus ``nightly`` (what the ``editd-nightly.timer`` unit runs). Errors editd raises on
purpose print one line (``editd: error: ...``) and exit 1; usage errors exit 2
(click's convention).
"""

from __future__ import annotations

import os

from daemon.cli import (  # noqa: F401 - register verbs
    demo,
    edits,
    evaluate,
    feeds,
    locate,
    model,
    serve,
    world,
)
from daemon.cli.app import cli
from daemon.files import PRIVATE_UMASK

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. What editd creates is private to its user (folders
    0700, files 0600), as under systemd's ``UMask=0077``."""
    os.umask(PRIVATE_UMASK)
    cli.main(args=argv, prog_name="editd")
