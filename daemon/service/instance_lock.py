"""One owner per store: an exclusive ``flock`` on ``<store path>.lock``.

``editd serve`` takes it before anything touches the store or the checkpoint folder
(before the checkpoint folder's recovery and the requeue of orphaned ``applying``
edits) and holds it for the process's lifetime, so a second daemon on the same store
exits at once, naming the holder, instead of requeueing the first one's in-flight
edits and writing into its checkpoint folder. A CLI verb that changes the store
where a daemon would (``editd edits retract`` and ``editd feeds poll`` when no
daemon answers) takes it for the length of its write and refuses when a daemon
holds it.

Verbs that only add to the store in its own transactions (``submit``, ``nightly``'s
spool import and release) need no lock: a running daemon picks their edits up.

The lock belongs to the open file, so it goes with the process however it ends
(even SIGKILL): a lock file left behind never blocks the next start. The file holds
the holder's pid and role as JSON, only to say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

import structlog

from daemon.errors import StoreInUseError
from daemon.files import make_private_dir, open_private

log = structlog.get_logger()

LOCK_SUFFIX = ".lock"
HOLDER_VERSION = 1


def lock_path(store_path: Path) -> Path:
    """The lock file of the store at ``store_path``: ``<store path>.lock`` beside it."""
    return store_path.with_name(store_path.name + LOCK_SUFFIX)


class StoreLock:
    """A held store lock; :meth:`release` (or leaving the ``with`` block) drops it."""

    def __init__(self, path: Path, fd: int, role: str) -> None:
        self.path = path
        self.role = role
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, store_path: Path, *, role: str) -> StoreLock:
        """Take the lock without waiting; ``StoreInUseError`` (with the holder's pid)
        when another process holds it. ``role`` says who holds it (e.g. ``daemon``).
        A store reached through a link is locked beside the file it points to."""
        path = lock_path(Path(store_path).resolve())
        make_private_dir(path.parent)
        fd = open_private(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, holder_role = _read_holder(fd)
            os.close(fd)
            raise StoreInUseError(store_path, path, pid, holder_role) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"version": HOLDER_VERSION, "pid": os.getpid(), "role": role, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        log.debug("store_lock_acquired", path=str(path), role=role)
        return cls(path, fd, role)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent); the emptied file stays for the next holder."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # still ours: nobody reads a pid that is gone
        finally:
            os.close(fd)  # releases the flock
        log.debug("store_lock_released", path=str(self.path), role=self.role)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    """The holder's pid and role from the lock file (None, None while it writes them)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    pid, role = data.get("pid"), data.get("role")
    return (
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        role if isinstance(role, str) else None,
    )
