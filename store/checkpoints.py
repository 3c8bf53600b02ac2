"""The checkpoint registry: snapshots of editor state on disk, good or bad.

A checkpoint's ``watermark`` is the id of the last event it includes (see
:func:`store.editlog.last_event_id`): restoring it means replaying later edits.
The snapshot files themselves belong to :mod:`daemon.service.checkpoints`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon.errors import RecordNotFoundError
from store import editlog
from store.db import Store
from store.editlog import EventKind

_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointStatus(StrEnum):
    """``bad`` marks a checkpoint that must not be restored (e.g. after drift)."""

    GOOD = "good"
    BAD = "bad"


@dataclass(frozen=True)
class CheckpointRecord:
    """One row of ``checkpoints``."""

    id: str
    path: str
    created_at: float
    watermark: int
    edit_count: int
    manifest_sha256: str
    status: CheckpointStatus
    note: str | None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {
            "id": self.id,
            "path": self.path,
            "created_at": self.created_at,
            "watermark": self.watermark,
            "edit_count": self.edit_count,
            "manifest_sha256": self.manifest_sha256,
            "status": self.status.value,
            "note": self.note,
        }


def record_checkpoint(
    store: Store,
    *,
    path: Path | str,
    watermark: int,
    edit_count: int,
    manifest_sha256: str,
    note: str | None = None,
    checkpoint_id: str | None = None,
) -> CheckpointRecord:
    """Register a checkpoint written at ``path`` (status ``good``)."""
    if not _SHA256.fullmatch(manifest_sha256):
        raise ValueError(
            f"manifest_sha256 must be 64 lowercase hex digits, got {manifest_sha256!r}"
        )
    if watermark < 0 or edit_count < 0:
        raise ValueError(f"watermark and edit_count must be >= 0, got {watermark}, {edit_count}")
    checkpoint_id = checkpoint_id or uuid.uuid4().hex
    row = {
        "id": checkpoint_id,
        "path": str(path),
        "created_at": store.now(),
        "watermark": watermark,
        "edit_count": edit_count,
        "manifest_sha256": manifest_sha256,
        "status": CheckpointStatus.GOOD.value,
        "note": note,
    }
    with store.write() as db:
        db.table("checkpoints").insert(row)
        data = {"path": str(path), "watermark": watermark, "edit_count": edit_count}
        editlog.append(store, EventKind.CHECKPOINT_RECORDED, data={"id": checkpoint_id, **data})
        return get_checkpoint(store, checkpoint_id)


def get_checkpoint(store: Store, checkpoint_id: str) -> CheckpointRecord:
    """The checkpoint with ``checkpoint_id``; raises :class:`RecordNotFoundError`."""
    found = _select(store, "id = ?", [checkpoint_id], 1)
    if not found:
        raise RecordNotFoundError("checkpoint", checkpoint_id)
    return found[0]


def list_checkpoints(
    store: Store, *, status: CheckpointStatus | str | None = None, limit: int = 100
) -> list[CheckpointRecord]:
    """Checkpoints, newest first, optionally only those with ``status``."""
    if status is None:
        return _select(store, "1 = 1", [], limit)
    return _select(store, "status = ?", [CheckpointStatus(status).value], limit)


def latest_good(store: Store) -> CheckpointRecord | None:
    """The newest checkpoint still marked ``good``, if any."""
    found = list_checkpoints(store, status=CheckpointStatus.GOOD, limit=1)
    return found[0] if found else None


def mark_bad(store: Store, checkpoint_id: str, note: str | None = None) -> CheckpointRecord:
    """Mark a checkpoint ``bad`` (never restored again); ``note`` says why."""
    with store.write() as db:
        get_checkpoint(store, checkpoint_id)
        db.execute(
            "UPDATE checkpoints SET status = 'bad', note = COALESCE(?, note) WHERE id = ?",
            [note, checkpoint_id],
        )
        data = {"id": checkpoint_id, "note": note}
        editlog.append(store, EventKind.CHECKPOINT_MARKED_BAD, data=data)
        return get_checkpoint(store, checkpoint_id)


def _select(store: Store, where: str, params: list[Any], limit: int) -> list[CheckpointRecord]:
    sql = f"SELECT * FROM checkpoints WHERE {where} ORDER BY created_at DESC, rowid DESC LIMIT ?"
    with store.read() as db:
        rows = list(db.query(sql, [*params, limit]))
    return [
        CheckpointRecord(
            id=row["id"],
            path=row["path"],
            created_at=float(row["created_at"]),
            watermark=int(row["watermark"]),
            edit_count=int(row["edit_count"]),
            manifest_sha256=row["manifest_sha256"],
            status=CheckpointStatus(row["status"]),
            note=row["note"],
        )
        for row in rows
    ]
