"""Named, versioned schema migrations, applied in order, each in its own transaction.

The schema version is ``PRAGMA user_version`` (written in the same transaction
as the migration); ``schema_migrations`` keeps the history (version, name, time).
A database whose version is newer than :data:`LATEST_VERSION`, or whose history
names a migration differently from this code, raises :class:`MigrationError`.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from sqlite_utils import Database

from daemon.errors import MigrationError


class Migratable(Protocol):
    """What migrating needs of a store (:class:`store.db.Store` is one)."""

    @property
    def path(self) -> Path: ...

    @property
    def db(self) -> Database: ...

    def write(self) -> AbstractContextManager[Database]: ...

    def now(self) -> float: ...


log = structlog.get_logger()


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` runs inside a transaction that also records ``version``."""

    version: int
    name: str
    apply: Callable[[Database], None]


def _sql(*statements: str) -> Callable[[Database], None]:
    def apply(db: Database) -> None:
        for statement in statements:
            db.execute(statement)

    return apply


_EDIT_STATUSES = (
    "'queued','applying','applied','failed','rejected','retracted','superseded','quarantined'"
)

_CREATE_EDITS = _sql(
    f"""CREATE TABLE edits (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        client_id TEXT,
        content_hash TEXT,
        request_json TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({_EDIT_STATUSES})),
        backend_requested TEXT NOT NULL DEFAULT 'auto',
        backend TEXT,
        batch_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        schedule TEXT NOT NULL DEFAULT 'now' CHECK (schedule IN ('now', 'nightly')),
        not_before REAL NOT NULL,
        lease_owner TEXT,
        lease_expires REAL,
        error TEXT,
        result_json TEXT,
        supersedes TEXT,
        source_kind TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        applied_at REAL
    )""",
    "CREATE INDEX edits_claim ON edits (status, schedule, not_before, seq)",
    "CREATE INDEX edits_content_hash ON edits (content_hash)",
    "CREATE INDEX edits_client_id ON edits (client_id)",
)

_CREATE_EVENTS = _sql(
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        edit_id TEXT,
        batch_id TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX events_edit ON events (edit_id, id)",
    "CREATE INDEX events_kind ON events (kind, id)",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE is not allowed'); END""",
)

_CREATE_BATCHES = _sql(
    """CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        backend TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'partial', 'failed')),
        created_at REAL NOT NULL,
        finished_at REAL,
        edit_ids TEXT NOT NULL DEFAULT '[]',
        error TEXT
    )""",
)

_CREATE_CHECKPOINTS_AND_PROBES = _sql(
    """CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        created_at REAL NOT NULL,
        watermark INTEGER NOT NULL,
        edit_count INTEGER NOT NULL CHECK (edit_count >= 0),
        manifest_sha256 TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'good' CHECK (status IN ('good', 'bad')),
        note TEXT
    )""",
    "CREATE INDEX checkpoints_status ON checkpoints (status, created_at)",
    """CREATE TABLE probe_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        passed INTEGER NOT NULL CHECK (passed IN (0, 1)),
        checkpoint_id TEXT REFERENCES checkpoints (id) ON DELETE SET NULL
    )""",
    "CREATE INDEX probe_runs_kind ON probe_runs (kind, id)",
)

_CREATE_FEEDS = _sql(
    """CREATE TABLE feeds (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        etag TEXT,
        last_modified TEXT,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'error')),
        last_error TEXT,
        last_polled_at REAL,
        interval_s REAL NOT NULL DEFAULT 3600 CHECK (interval_s > 0)
    )""",
    """CREATE TABLE feed_items (
        feed TEXT NOT NULL REFERENCES feeds (name) ON DELETE CASCADE,
        item_id TEXT NOT NULL,
        content_hash TEXT,
        edit_id TEXT REFERENCES edits (id),
        seen_at REAL NOT NULL,
        PRIMARY KEY (feed, item_id)
    )""",
)

_FEED_ITEMS_AND_SPOOL = _sql(
    # Polling state: consecutive failures (back-off) and when the feed is next due.
    "ALTER TABLE feeds ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE feeds ADD COLUMN next_poll_at REAL",
    "ALTER TABLE feeds ADD COLUMN added_at REAL",
    # A malformed item is remembered with its reason; updated_at moves on a change.
    "ALTER TABLE feed_items ADD COLUMN error TEXT",
    "ALTER TABLE feed_items ADD COLUMN updated_at REAL",
    # The edits an item produced, one per slot ("fact_edit", or an extractor's
    # relation and subject), with the extractor and the text it matched (provenance).
    """CREATE TABLE feed_item_edits (
        feed TEXT NOT NULL,
        item_id TEXT NOT NULL,
        slot TEXT NOT NULL,
        edit_id TEXT NOT NULL REFERENCES edits (id),
        extractor TEXT NOT NULL,
        evidence TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (feed, item_id, slot),
        FOREIGN KEY (feed, item_id) REFERENCES feed_items (feed, item_id) ON DELETE CASCADE
    )""",
    "CREATE INDEX feed_item_edits_edit ON feed_item_edits (edit_id)",
    # One row per spool file imported, keyed by content: the import and this row
    # commit in one transaction, so a file is imported exactly once.
    """CREATE TABLE spool_files (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('imported', 'processed', 'rejected')),
        lines INTEGER NOT NULL DEFAULT 0,
        accepted INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        report TEXT NOT NULL DEFAULT '{}',
        run_id INTEGER REFERENCES nightly_runs (id) ON DELETE SET NULL,
        imported_at REAL NOT NULL,
        finished_at REAL
    )""",
    """CREATE TABLE nightly_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        trigger TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        started_at REAL NOT NULL,
        finished_at REAL,
        summary TEXT NOT NULL DEFAULT '{}'
    )""",
)

_SPOOL_IMPORT_IN_CHUNKS = _sql(
    # A file is imported in chunks, each in its own transaction: its row is inserted
    # first as 'importing', lines_done is the last line of the last committed chunk,
    # and each chunk's results wait in spool_file_chunks until the file is imported.
    # SQLite cannot change a CHECK constraint in place: the table is rebuilt.
    """CREATE TABLE spool_files_new (
        sha256 TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('importing', 'imported', 'processed', 'rejected')),
        lines INTEGER NOT NULL DEFAULT 0,
        accepted INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        report TEXT NOT NULL DEFAULT '{}',
        run_id INTEGER REFERENCES nightly_runs (id) ON DELETE SET NULL,
        imported_at REAL NOT NULL,
        finished_at REAL,
        lines_done INTEGER NOT NULL DEFAULT 0 CHECK (lines_done >= 0)
    )""",
    """INSERT INTO spool_files_new (sha256, name, status, lines, accepted, rejected,
        duplicates, report, run_id, imported_at, finished_at)
    SELECT sha256, name, status, lines, accepted, rejected, duplicates, report, run_id,
        imported_at, finished_at FROM spool_files""",
    "DROP TABLE spool_files",
    "ALTER TABLE spool_files_new RENAME TO spool_files",
    """CREATE TABLE spool_file_chunks (
        sha256 TEXT NOT NULL REFERENCES spool_files (sha256) ON DELETE CASCADE,
        first_line INTEGER NOT NULL CHECK (first_line >= 1),
        last_line INTEGER NOT NULL CHECK (last_line >= first_line),
        result TEXT NOT NULL,
        PRIMARY KEY (sha256, first_line)
    )""",
)

_EDIT_KINDS = _sql(
    # What an edit does (store.schema.EditKind), as a column so that listings filter
    # on it; every edit before this migration was a fact edit.
    """ALTER TABLE edits ADD COLUMN kind TEXT NOT NULL DEFAULT 'fact'
        CHECK (kind IN ('fact', 'forget', 'behaviour'))""",
    "CREATE INDEX edits_kind ON edits (kind, seq)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create_edits", _CREATE_EDITS),
    Migration(2, "create_events", _CREATE_EVENTS),
    Migration(3, "create_batches", _CREATE_BATCHES),
    Migration(4, "create_checkpoints_and_probe_runs", _CREATE_CHECKPOINTS_AND_PROBES),
    Migration(5, "create_feeds", _CREATE_FEEDS),
    Migration(6, "feed_items_and_spool", _FEED_ITEMS_AND_SPOOL),
    Migration(7, "spool_import_in_chunks", _SPOOL_IMPORT_IN_CHUNKS),
    Migration(8, "edit_kinds", _EDIT_KINDS),
)
LATEST_VERSION = MIGRATIONS[-1].version

_CREATE_HISTORY = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


def current_version(db: Database) -> int:
    """The schema version recorded in the database (0 for a new one)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(store: Migratable, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the pending ``migrations`` in version order; return the names applied.

    Safe to run from several processes at once: each step re-reads the version
    under the write lock and skips work another process already did.
    """
    _check_order(migrations)
    latest = migrations[-1].version if migrations else 0
    try:
        _check_known(store, migrations, latest)
    except sqlite3.Error as exc:
        raise MigrationError(
            f"store {store.path}: cannot read the schema history: {exc}", path=store.path
        ) from exc
    applied: list[str] = []
    for migration in migrations:
        if migration.version <= current_version(store.db):
            continue
        if _apply(store, migration):
            applied.append(migration.name)
            log.info("migration_applied", version=migration.version, name=migration.name)
    return applied


def _apply(store: Migratable, migration: Migration) -> bool:
    try:
        with store.write() as db:
            if migration.version <= current_version(db):
                return False
            db.execute(_CREATE_HISTORY)
            migration.apply(db)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                [migration.version, migration.name, store.now()],
            )
            db.execute(f"PRAGMA user_version = {int(migration.version)}")
    except sqlite3.Error as exc:
        raise MigrationError(
            f"store {store.path}: migration {migration.version} '{migration.name}' failed: {exc}",
            path=store.path,
            version=migration.version,
        ) from exc
    return True


def _check_order(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise MigrationError(f"migration versions must be unique, positive and ordered: {versions}")


def _check_known(store: Migratable, migrations: Sequence[Migration], latest: int) -> None:
    """Refuse a database that is newer than this code or disagrees with its history."""
    version = current_version(store.db)
    if version > latest:
        raise MigrationError(
            f"store {store.path}: schema version {version} is newer than this code "
            f"(which knows up to {latest}); upgrade editd",
            path=store.path,
            version=version,
        )
    if version == 0:
        return
    names = {m.version: m.name for m in migrations}
    for row in store.db.query("SELECT version, name FROM schema_migrations ORDER BY version"):
        if names.get(row["version"]) != row["name"]:
            raise MigrationError(
                f"store {store.path}: migration {row['version']} is recorded as "
                f"'{row['name']}', but this code names it '{names.get(row['version'])}'",
                path=store.path,
                version=row["version"],
            )
