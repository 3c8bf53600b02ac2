"""Rows of the ``edits`` table: the decoded :class:`EditRecord` and the SQL around it.

Helpers here take a :class:`sqlite_utils.Database` and expect the caller's
transaction (:meth:`store.db.Store.write`); :mod:`store.queue` owns the rules.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlite_utils import Database

from daemon.errors import EditNotFoundError, EditValidationError
from store.schema import (
    Backend,
    EditKind,
    EditRequest,
    EditStatus,
    RequestLimits,
    Schedule,
    canonical_json,
)
from store.validation import parse_edit_request

MAX_RAW_BYTES = 64 * 1024
"""Rejected input is kept as raw text, truncated to this many UTF-8 bytes."""

# Stored requests were valid under the limits of their day; decode them under none.
_NO_LIMITS = RequestLimits(
    **{f.name: sys.maxsize for f in fields(RequestLimits) if f.type == "int"}  # type: ignore[arg-type]
)


@dataclass(frozen=True)
class EditRecord:
    """One edit as stored, every column decoded.

    ``request`` is the validated :class:`EditRequest`, or ``None`` for a rejected
    record, whose input is kept verbatim (truncated) in ``raw_request``.
    """

    id: str
    seq: int
    status: EditStatus
    request: EditRequest | None
    raw_request: str
    client_id: str | None
    content_hash: str | None
    backend_requested: Backend
    kind: EditKind
    backend: str | None
    batch_id: str | None
    attempts: int
    schedule: Schedule
    not_before: float
    lease_owner: str | None
    lease_expires: float | None
    error: str | None
    result: dict[str, Any] | None
    supersedes: str | None
    source_kind: str
    created_at: float
    updated_at: float
    applied_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EditRecord:
        """Decode one row of ``edits`` (a column-name mapping)."""
        status = EditStatus(row["status"])
        return cls(
            id=row["id"],
            seq=int(row["seq"]),
            status=status,
            request=None if status is EditStatus.REJECTED else _decode(row["request_json"]),
            raw_request=row["request_json"],
            client_id=row["client_id"],
            content_hash=row["content_hash"],
            backend_requested=Backend(row["backend_requested"]),
            kind=EditKind(row["kind"]),
            backend=row["backend"],
            batch_id=row["batch_id"],
            attempts=int(row["attempts"]),
            schedule=Schedule(row["schedule"]),
            not_before=float(row["not_before"]),
            lease_owner=row["lease_owner"],
            lease_expires=_float(row["lease_expires"]),
            error=row["error"],
            result=None if row["result_json"] is None else json.loads(row["result_json"]),
            supersedes=row["supersedes"],
            source_kind=row["source_kind"],
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            applied_at=_float(row["applied_at"]),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The API's view of the record (``raw_request`` only for rejected input)."""
        out: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "status": self.status.value,
            "kind": self.kind.value,
            "client_id": self.client_id,
            "content_hash": self.content_hash,
            "request": None if self.request is None else self.request.to_json_dict(),
        }
        if self.request is None:
            out["raw_request"] = self.raw_request
        out.update(
            backend_requested=self.backend_requested.value,
            backend=self.backend,
            batch_id=self.batch_id,
            attempts=self.attempts,
            schedule=self.schedule.value,
            not_before=self.not_before,
            lease_owner=self.lease_owner,
            lease_expires=self.lease_expires,
            error=self.error,
            result=self.result,
            supersedes=self.supersedes,
            source_kind=self.source_kind,
            created_at=self.created_at,
            updated_at=self.updated_at,
            applied_at=self.applied_at,
        )
        return out


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _decode(request_json: str) -> EditRequest | None:
    try:
        return parse_edit_request(json.loads(request_json), limits=_NO_LIMITS)
    except (EditValidationError, ValueError):
        return None


def storable(text: str, max_bytes: int = MAX_RAW_BYTES) -> str:
    """``text`` made safe to store: lone surrogates escaped, cut to ``max_bytes`` of UTF-8."""
    data = text.encode("utf-8", "backslashreplace")
    return data[:max_bytes].decode("utf-8", "ignore")


def fetch(db: Database, edit_id: str) -> EditRecord | None:
    """The record with ``edit_id``, or ``None``."""
    for row in db.query("SELECT * FROM edits WHERE id = ?", [edit_id]):
        return EditRecord.from_row(row)
    return None


def fetch_existing(db: Database, edit_id: str) -> EditRecord:
    """The record with ``edit_id``; raises :class:`EditNotFoundError`."""
    record = fetch(db, edit_id)
    if record is None:
        raise EditNotFoundError(edit_id)
    return record


def fetch_many(db: Database, where: str, params: list[Any], limit: int) -> list[EditRecord]:
    """Records matching a SQL ``where`` fragment, in queue (``seq``) order."""
    sql = f"SELECT * FROM edits WHERE {where} ORDER BY seq LIMIT ?"
    return [EditRecord.from_row(row) for row in db.query(sql, [*params, limit])]


def find_live_by_hash(db: Database, content_hash: str) -> EditRecord | None:
    """The oldest live (queued, applying, applied, quarantined) edit with this content."""
    sql = (
        "SELECT * FROM edits WHERE content_hash = ? "
        "AND status IN ('queued', 'applying', 'applied', 'quarantined') ORDER BY seq LIMIT 1"
    )
    for row in db.query(sql, [content_hash]):
        return EditRecord.from_row(row)
    return None


def insert(db: Database, row: dict[str, Any]) -> None:
    """Insert a new edit at the tail of the queue (``seq`` assigned here)."""
    next_seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM edits").fetchone()[0]
    values = {**row, "seq": int(next_seq)}
    columns = ", ".join(values)  # our own column names, never user input
    marks = ", ".join("?" for _ in values)
    db.execute(f"INSERT INTO edits ({columns}) VALUES ({marks})", list(values.values()))


def update(db: Database, edit_id: str, now: float, **values: Any) -> None:
    """Set columns of one edit (and ``updated_at``); enums are stored by value."""
    values["updated_at"] = now
    assignments = ", ".join(f"{column} = ?" for column in values)
    params = [
        v.value if isinstance(v, EditStatus | Schedule) else str(v) if isinstance(v, Backend) else v
        for v in values.values()
    ]
    db.execute(f"UPDATE edits SET {assignments} WHERE id = ?", [*params, edit_id])


def request_row(request: EditRequest, edit_id: str, source_kind: str, now: float) -> dict[str, Any]:
    """The row for a new, valid request entering the queue."""
    return {
        "id": edit_id,
        "client_id": request.id,
        "content_hash": request.content_hash(),
        "request_json": canonical_json(request.to_json_dict()),
        "status": EditStatus.QUEUED.value,
        "backend_requested": request.backend.value,
        "kind": request.kind.value,
        "attempts": 0,
        "schedule": request.schedule.value,
        "not_before": now,
        "supersedes": request.supersedes,
        "source_kind": source_kind,
        "created_at": now,
        "updated_at": now,
    }


def rejected_row(
    edit_id: str, raw_text: str, reason: str, client_id: str | None, source_kind: str, now: float
) -> dict[str, Any]:
    """The row for rejected input: kept verbatim (truncated) with its reason."""
    return {
        "id": edit_id,
        "client_id": None if client_id is None else storable(client_id, 800),
        "content_hash": None,
        "request_json": storable(raw_text),
        "status": EditStatus.REJECTED.value,
        "backend_requested": Backend.AUTO.value,
        "attempts": 0,
        "schedule": Schedule.NOW.value,
        "not_before": now,
        "error": storable(reason, 4096),
        "source_kind": source_kind,
        "created_at": now,
        "updated_at": now,
    }


def counts(db: Database) -> dict[str, int]:
    """Number of edits in every state (zeros included)."""
    out = {status.value: 0 for status in EditStatus}
    for status, count in db.execute("SELECT status, COUNT(*) FROM edits GROUP BY status"):
        out[str(status)] = int(count)
    return out


def counts_by_backend(db: Database) -> dict[tuple[str, str], int]:
    """Number of edits per ``(status, backend)``; ``backend`` is ``""`` where unset."""
    rows = db.execute(
        "SELECT status, COALESCE(backend, ''), COUNT(*) FROM edits GROUP BY status, backend"
    )
    return {(str(s), str(b)): int(n) for s, b, n in rows}


def in_status(db: Database, status: EditStatus) -> list[EditRecord]:
    """Every edit in ``status``, in the order it reached it (``applied_at``, then queue order)."""
    rows = db.query("SELECT * FROM edits WHERE status = ? ORDER BY applied_at, seq", [status.value])
    return [EditRecord.from_row(row) for row in rows]
