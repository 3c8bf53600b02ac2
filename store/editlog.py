"""The append-only event log: every state change of an edit, batch or checkpoint.

Rows of ``events`` are never updated or deleted (SQLite triggers abort both).
Callers append inside the same transaction as the change they record, so the
log and the tables cannot disagree. Event kinds are snake_case, past tense.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store.db import Store

_COLUMNS = "id, ts, kind, edit_id, batch_id, data"
_KIND = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


class EventKind(StrEnum):
    """The kinds the store itself writes; other components may append their own."""

    EDIT_ENQUEUED = "edit_enqueued"
    EDIT_REJECTED = "edit_rejected"
    EDIT_CLAIMED = "edit_claimed"
    EDIT_APPLIED = "edit_applied"
    EDIT_FAILED = "edit_failed"
    EDIT_REQUEUED = "edit_requeued"
    EDIT_RELEASED = "edit_released"
    EDIT_SCHEDULE_RELEASED = "edit_schedule_released"
    EDIT_REAPPLY_STARTED = "edit_reapply_started"
    EDIT_RETRACTED = "edit_retracted"
    EDIT_SUPERSEDED = "edit_superseded"
    EDIT_QUARANTINED = "edit_quarantined"
    LEASE_EXPIRED = "lease_expired"
    BATCH_CREATED = "batch_created"
    BATCH_FINISHED = "batch_finished"
    CHECKPOINT_RECORDED = "checkpoint_recorded"
    CHECKPOINT_MARKED_BAD = "checkpoint_marked_bad"
    PROBE_RUN_RECORDED = "probe_run_recorded"


@dataclass(frozen=True)
class Event:
    """One row of the event log."""

    id: int
    ts: float
    kind: str
    edit_id: str | None
    batch_id: str | None
    data: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "edit_id": self.edit_id,
            "batch_id": self.batch_id,
            "data": self.data,
        }


def append(
    store: Store,
    kind: str,
    *,
    edit_id: str | None = None,
    batch_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> int:
    """Append one event (joining the caller's transaction, if any); return its id.

    ``kind`` must be snake_case with at least two words (``edit_applied``).
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(f"event kind must be snake_case past tense, got {kind!r}")
    payload = json.dumps(data or {}, sort_keys=True, ensure_ascii=True, default=str)
    with store.write() as db:
        cursor = db.execute(
            "INSERT INTO events (ts, kind, edit_id, batch_id, data) VALUES (?, ?, ?, ?, ?)",
            [store.now(), str(kind), edit_id, batch_id, payload],
        )
        return int(cursor.lastrowid or 0)


def events(
    store: Store,
    *,
    edit_id: str | None = None,
    batch_id: str | None = None,
    kind: str | None = None,
    after_id: int = 0,
    limit: int = 1000,
) -> list[Event]:
    """Events with ``id > after_id`` in id order, optionally for one edit, batch or kind."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    where: list[str] = ["id > ?"]
    params: list[object] = [after_id]
    for column, value in (("edit_id", edit_id), ("batch_id", batch_id), ("kind", kind)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
    with store.read() as db:
        rows = db.execute(sql, [*params, limit]).fetchall()
    return [_event(row) for row in rows]


def last_event_id(store: Store) -> int:
    """The id of the newest event (0 when the log is empty): a checkpoint watermark."""
    with store.read() as db:
        return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def _event(row: tuple[Any, ...]) -> Event:
    event_id, ts, kind, edit_id, batch_id, data = row
    return Event(
        id=int(event_id),
        ts=float(ts),
        kind=str(kind),
        edit_id=edit_id,
        batch_id=batch_id,
        data=json.loads(data),
    )
