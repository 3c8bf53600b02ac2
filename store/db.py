"""Opening the SQLite store and running transactions on it.

One :class:`Store` wraps one connection (WAL journal, 10 s busy timeout,
foreign keys on, ``synchronous=FULL``). Every process opens its own; a store
may be shared by threads of one process, which take turns through an internal
lock. Writers in different processes serialise on SQLite's write lock because
:meth:`Store.write` starts with ``BEGIN IMMEDIATE``: a transaction never has to
upgrade a read lock, so it waits for its turn instead of failing with
``database is locked``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import structlog
from sqlite_utils import Database

from daemon.errors import (
    StoreBusyError,
    StoreError,
    StoreIntegrityError,
    StoreUnavailableError,
)
from store import migrations

Clock = Callable[[], float]
"""Returns the current time as seconds since the epoch (``time.time`` in production)."""

BUSY_TIMEOUT_S = 10.0
SQLITE_HEADER = b"SQLite format 3\x00"

log = structlog.get_logger()


class Store:
    """An open editd store. Create it with :meth:`Store.open`; use it as a context manager."""

    def __init__(self, db: Database, path: Path, clock: Clock) -> None:
        self.db = db
        """The :class:`sqlite_utils.Database` on this store's connection."""
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._savepoints = 0
        self._reading = False
        self._closed = False

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        create: bool = True,
        clock: Clock = time.time,
        quick_check: bool = False,
    ) -> Store:
        """Open (and with ``create``, create) the store at ``path`` and migrate its schema.

        Raises :class:`StoreUnavailableError` when the file is missing (``create=False``),
        unreadable or not a SQLite database; such a file is left byte-for-byte as it was.
        With ``quick_check`` (the daemon's start-up) ``PRAGMA quick_check`` runs before any
        migration and a damaged file raises :class:`StoreIntegrityError`, untouched.
        Raises :class:`MigrationError` when the database is newer than this code.
        """
        path = Path(path)
        _check_file(path, create)
        store = cls(Database(_connect(path, create), execute_plugins=False), path, clock)
        try:
            store._configure()
            if quick_check:
                store._require_sound()
            applied = migrations.migrate(store)
        except BaseException:
            store.close()
            raise
        log.debug("store_opened", path=str(path), migrations_applied=applied)
        return store

    def now(self) -> float:
        """The store's clock: seconds since the epoch."""
        return float(self._clock())

    @contextmanager
    def write(self) -> Iterator[Database]:
        """A write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

        Nested use opens a savepoint inside the outer transaction, so an inner block
        that fails is undone alone and the outer one decides about the rest.
        """
        with self._lock:
            if self._reading:
                raise StoreError(f"store {self.path}: write() inside read() is not allowed")
            if self.db.conn.in_transaction:
                with self._savepoint():
                    yield self.db
            else:
                with self._immediate():
                    yield self.db

    @contextmanager
    def read(self) -> Iterator[Database]:
        """A consistent read: one snapshot for every query in the block (or the open write's).

        A read that is not inside a write may not write: upgrading its snapshot to a
        write could fail with ``SQLITE_BUSY``; start with :meth:`write` instead.
        """
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield self.db
                return
            conn.execute("BEGIN")
            self._reading = True
            try:
                yield self.db
            finally:
                self._reading = False
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s verdict: ``"ok"`` for a sound database."""
        with self.read() as db:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(row[0]) for row in rows)

    def quick_check(self) -> str:
        """``PRAGMA quick_check``'s verdict (``"ok"`` for a sound file): the cheaper
        integrity check, O(N) in the file's size, without the index cross-checks."""
        with self.read() as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
        return "; ".join(str(row[0]) for row in rows)

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        return migrations.current_version(self.db)

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        if not self._closed:
            self._closed = True
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def _immediate(self) -> Iterator[None]:
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreBusyError(
                f"store {self.path}: could not start a write transaction: {exc}", path=self.path
            ) from exc
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        conn = self.db.conn
        self._savepoints += 1
        name = f"editd_sp_{self._savepoints}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
            raise
        else:
            conn.execute(f"RELEASE {name}")
        finally:
            self._savepoints -= 1

    def _configure(self) -> None:
        try:
            # Reads the header first: a file that is not a database fails here, unwritten.
            self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = FULL")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise _unavailable(self.path, str(exc)) from exc
        if str(mode).lower() != "wal":
            raise _unavailable(self.path, f"cannot switch to WAL (journal mode is {mode!r})")

    def _require_sound(self) -> None:
        t0 = time.perf_counter()
        try:
            verdict = self.quick_check()
        except sqlite3.DatabaseError as exc:
            raise StoreIntegrityError(self.path, str(exc)) from exc
        if verdict != "ok":
            raise StoreIntegrityError(self.path, verdict[:1000])
        log.info("store_checked", path=str(self.path), seconds=round(time.perf_counter() - t0, 3))


def _unavailable(path: Path, reason: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"store {path}: {reason}", path=path)


def _check_file(path: Path, create: bool) -> None:
    """Refuse folders, missing files (unless ``create``) and files that are not SQLite."""
    if path.is_dir():
        raise _unavailable(path, "is a folder, not a SQLite database")
    if not path.exists():
        if not create:
            raise _unavailable(path, "does not exist")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unavailable(path, f"cannot create its folder: {exc.strerror}") from exc
        return
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise _unavailable(path, f"cannot read: {exc.strerror}") from exc
    if header and header != SQLITE_HEADER:
        raise _unavailable(path, "not a SQLite database")


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are begun explicitly, never implicitly."""
    mode = "rwc" if create else "rw"
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode={mode}"
    try:
        return sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise _unavailable(path, str(exc)) from exc
