"""Atomic file writes (a temp file in the same folder, then a rename onto the target),
atomic folder swaps, file digests and directory fsync.

A reader (or a restart after a crash) sees either the old file or the new one,
never a half-written one. Used for every artefact editd writes outside SQLite.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp path beside ``path``, fsync it, rename it onto ``path``."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)  # atomic on POSIX (os.replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks; ``fsync`` also flushes it to disk."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_folder(new: Path, out: Path, old: Path) -> None:
    """Move the finished folder ``new`` to ``out``; an existing ``out`` goes to ``old``
    first, and back if the move fails. The caller removes ``old`` afterwards."""
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    fsync_dir(out.parent)
