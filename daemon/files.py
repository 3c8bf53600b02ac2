"""How editd writes its own files: atomic writes (a temp file in the same folder, then a
rename onto the target), atomic folder swaps, private no-follow opens, file digests and
directory fsync.

A reader (or a restart after a crash) sees either the old file or the new one,
never a half-written one. Used for every artefact editd writes outside SQLite.

editd's state (store, checkpoints, spool, caches under ``var/``) is private to the
user that runs it: the ``editd`` command sets :data:`PRIVATE_UMASK` (folders 0700,
files 0600; ``UMask=0077`` does the same under systemd), and a file that editd
opens in place at a fixed name (a lock, a port file) goes through
:func:`open_private`, which creates it 0600 and refuses a symbolic link planted
there instead of writing through it. Atomic writes need no such care: a rename
replaces a link, it never follows one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from daemon.errors import UnsafePathError

PRIVATE_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


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


def open_private(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """``os.open(path, flags)`` that never follows a symbolic link at ``path``
    (``UnsafePathError``), creates the file 0600 and is closed in child processes."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(path) from exc
        raise


def write_private_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` in place (created 0600, truncated, no links)."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def make_private_dir(folder: Path) -> None:
    """Create ``folder`` as 0700 (missing parents as the umask allows); an existing one
    is left as it is."""
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
