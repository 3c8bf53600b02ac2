"""The ``editd`` command.

Every verb from DESIGN.md is listed in ``editd --help``, plus ``nightly`` (what
the ``editd-nightly.timer`` unit runs). Errors
editd raises on purpose print one line (``editd: error: ...``) and exit 1;
usage errors exit 2 (click's convention).
"""

from __future__ import annotations

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

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="editd")
