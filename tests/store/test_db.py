"""Opening the store, its pragmas, migrations, transactions and the append-only log."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import (
    MigrationError,
    StoreBusyError,
    StoreError,
    StoreIntegrityError,
    StoreUnavailableError,
)
from store import editlog, migrations
from store.db import Store
from store.migrations import LATEST_VERSION, Migration
from store.queue import EditQueue
from tests.store.helpers import request


def test_open_creates_folder_and_sets_pragmas(store_path: Path) -> None:
    """A new store gets its folder, WAL, foreign keys, FULL sync and a 10 s busy timeout."""
    with Store.open(store_path) as st:
        assert store_path.is_file()

        def pragma(name: str) -> object:
            return st.db.execute(f"PRAGMA {name}").fetchone()[0]

        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("synchronous") == 2  # FULL
        assert pragma("busy_timeout") == 10_000
        assert st.schema_version() == LATEST_VERSION
        assert {"edits", "batches", "events", "checkpoints", "probe_runs", "feeds"} <= set(
            st.db.table_names()
        )
        assert st.integrity_check() == "ok"


@pytest.mark.parametrize(
    "content", [b"hello, this is not a database at all" * 10, b"x", b"SQLite format 2\x00" * 8]
)
def test_non_sqlite_file_is_unavailable_and_untouched(store_path: Path, content: bytes) -> None:
    """A file that is not SQLite raises StoreUnavailableError and keeps its bytes."""
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(content)
    for create in (True, False):
        with pytest.raises(StoreUnavailableError) as info:
            Store.open(store_path, create=create)
        assert str(store_path) in str(info.value) and "\n" not in str(info.value)
    assert store_path.read_bytes() == content
    assert sorted(p.name for p in store_path.parent.iterdir()) == [store_path.name]


def test_corrupt_sqlite_file_is_unavailable_and_untouched(store_path: Path) -> None:
    """A file with a SQLite header but garbage after it is refused, unchanged."""
    store_path.parent.mkdir(parents=True)
    content = b"SQLite format 3\x00" + os.urandom(4000)
    store_path.write_bytes(content)
    with pytest.raises(StoreUnavailableError):
        Store.open(store_path)
    assert store_path.read_bytes() == content


def test_quick_check_at_open_refuses_a_damaged_store_untouched(store_path: Path) -> None:
    """A store whose header and schema read fine but whose data pages are damaged opens
    without the check; with ``quick_check`` (the daemon's start-up) it raises
    StoreIntegrityError naming the file, and the file keeps its bytes."""
    with Store.open(store_path) as st:
        EditQueue(st).submit_many(
            [request(n, prompt=f"The CEO of A{n} is " + "x" * 300) for n in range(60)]
        )
        assert st.quick_check() == "ok"
        (page,) = st.db.execute(
            "SELECT MAX(pageno) FROM dbstat WHERE name = 'edits' AND pagetype = 'leaf'"
        ).fetchone()
        size = int(st.db.execute("PRAGMA page_size").fetchone()[0])
    data = bytearray(store_path.read_bytes())
    data[(page - 1) * size : page * size] = b"\xff" * size
    store_path.write_bytes(bytes(data))
    Store.open(store_path).close()
    with pytest.raises(StoreIntegrityError) as info:
        Store.open(store_path, quick_check=True)
    assert str(store_path) in str(info.value) and info.value.verdict
    assert info.value.context["path"] == store_path
    assert store_path.read_bytes() == bytes(data)


def test_missing_file_with_create_false(store_path: Path) -> None:
    """create=False never creates a file (or its folder)."""
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        Store.open(store_path, create=False)
    assert not store_path.parent.exists()


def test_folder_is_unavailable(tmp_path: Path) -> None:
    """A folder is not a store."""
    with pytest.raises(StoreUnavailableError, match="folder"):
        Store.open(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(store_path: Path) -> None:
    """A file without read permission is unavailable."""
    Store.open(store_path).close()
    store_path.chmod(0)
    try:
        with pytest.raises(StoreUnavailableError):
            Store.open(store_path)
    finally:
        store_path.chmod(0o600)


def test_reopen_does_not_rerun_migrations(store_path: Path) -> None:
    """A second open finds everything applied and changes nothing."""
    Store.open(store_path).close()
    with Store.open(store_path) as st:
        history = list(st.db.query("SELECT * FROM schema_migrations ORDER BY version"))
    with capture_logs() as logs, Store.open(store_path, create=False) as st:
        assert list(st.db.query("SELECT * FROM schema_migrations ORDER BY version")) == history
    assert [m.name for m in migrations.MIGRATIONS] == [row["name"] for row in history]
    assert not [e for e in logs if e["event"] == "migration_applied"]


def test_newer_database_raises_migration_error(store_path: Path) -> None:
    """A schema version beyond this code's is refused."""
    Store.open(store_path).close()
    with sqlite3.connect(store_path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(MigrationError, match="newer than this code"):
        Store.open(store_path)


def test_renamed_migration_in_history_is_refused(store_path: Path) -> None:
    """A history that names a migration differently from the code is refused."""
    with Store.open(store_path) as st:
        st.db.execute("UPDATE schema_migrations SET name = 'other' WHERE version = 1")
    with pytest.raises(MigrationError, match="recorded as 'other'"):
        Store.open(store_path)


def test_failed_migration_is_rolled_back(store: Store) -> None:
    """A migration that fails leaves neither its tables nor its version behind."""

    def broken(db: object) -> None:
        store.db.execute("CREATE TABLE half_done (x)")
        store.db.execute("THIS IS NOT SQL")

    extra = (*migrations.MIGRATIONS, Migration(LATEST_VERSION + 1, "broken", broken))
    with pytest.raises(MigrationError, match="'broken' failed"):
        migrations.migrate(store, extra)
    assert "half_done" not in store.db.table_names()
    assert store.schema_version() == LATEST_VERSION
    good = (*migrations.MIGRATIONS, Migration(LATEST_VERSION + 1, "ok", lambda db: None))
    assert migrations.migrate(store, good) == ["ok"]
    assert migrations.migrate(store, good) == []


def test_write_rolls_back_on_exception(store: Store) -> None:
    """An exception inside write() undoes everything the block did."""
    with pytest.raises(RuntimeError), store.write():
        editlog.append(store, "thing_happened")
        raise RuntimeError("boom")
    assert editlog.events(store) == []
    assert not store.db.conn.in_transaction


def test_nested_write_uses_a_savepoint(store: Store) -> None:
    """A failing inner block is undone alone; the outer block commits the rest."""
    with store.write():
        editlog.append(store, "outer_happened")
        with pytest.raises(ValueError), store.write():
            editlog.append(store, "inner_happened")
            raise ValueError("inner")
    assert [e.kind for e in editlog.events(store)] == ["outer_happened"]


def test_write_takes_the_lock_immediately(store: Store, store_path: Path) -> None:
    """BEGIN IMMEDIATE: a second writer waits for the lock and reports busy, not a bad upgrade."""
    other = sqlite3.connect(store_path, timeout=0.1, isolation_level=None)
    try:
        with store.write():
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            assert other.execute("SELECT count(*) FROM edits").fetchone() == (0,)
    finally:
        other.close()


def test_busy_store_raises_store_busy_error(store_path: Path) -> None:
    """When another connection holds the write lock past the timeout, StoreBusyError."""
    with Store.open(store_path) as st:
        st.db.execute("PRAGMA busy_timeout = 100")
        other = sqlite3.connect(store_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreBusyError), st.write():
                pass
        finally:
            other.execute("ROLLBACK")
            other.close()


def test_events_are_append_only(store: Store) -> None:
    """Triggers abort UPDATE and DELETE on events, even from raw SQL."""
    editlog.append(store, "edit_enqueued", edit_id="e1", data={"a": 1})
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE events SET kind = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM events")
    assert [(e.kind, e.edit_id, e.data) for e in editlog.events(store)] == [
        ("edit_enqueued", "e1", {"a": 1})
    ]


def test_clock_is_injected(store_path: Path) -> None:
    """store.now() reads the given clock."""
    with Store.open(store_path, clock=lambda: 42.0) as st:
        assert st.now() == 42.0


def test_write_inside_read_is_refused(store: Store) -> None:
    """A read snapshot is never upgraded to a write (it could fail with SQLITE_BUSY)."""
    with pytest.raises(StoreError, match="inside read"), store.read(), store.write():
        pass
    with store.write(), store.read():
        editlog.append(store, "reads_nested_in_writes_allowed")
    assert len(editlog.events(store)) == 1


def test_threads_share_a_store(store: Store) -> None:
    """Threads of one process take turns on one connection without mixing transactions."""
    queue = EditQueue(store)

    def work(worker: int) -> None:
        for i in range(25):
            queue.submit(request(worker * 100 + i))
            for record in queue.claim(2, 30, f"t{worker}"):
                queue.ack(record.id, f"t{worker}", backend="melo")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for record in queue.claim(1000, 30, "final"):
        queue.ack(record.id, "final", backend="melo")
    assert queue.counts()["applied"] == 100
    assert len(editlog.events(store, kind="edit_applied")) == 100
