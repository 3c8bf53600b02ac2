"""Batches: groups of edits a worker applies together with one back-end."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from daemon.errors import RecordNotFoundError, StoreError
from store import editlog
from store.db import Store
from store.editlog import EventKind
from store.schema import Backend


class BatchStatus(StrEnum):
    """A batch is ``running`` until finished as succeeded, partial or failed."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchRecord:
    """One row of ``batches``."""

    id: str
    backend: str
    status: BatchStatus
    created_at: float
    finished_at: float | None
    edit_ids: tuple[str, ...]
    error: str | None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {
            "id": self.id,
            "backend": self.backend,
            "status": self.status.value,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "edit_ids": list(self.edit_ids),
            "error": self.error,
        }


def create_batch(store: Store, backend: Backend | str, edit_ids: Sequence[str]) -> str:
    """Record a new ``running`` batch of ``edit_ids`` for ``backend``; return its id."""
    backend = Backend(backend)
    batch_id = uuid.uuid4().hex
    with store.write() as db:
        db.table("batches").insert(
            {
                "id": batch_id,
                "backend": backend.value,
                "status": BatchStatus.RUNNING.value,
                "created_at": store.now(),
                "edit_ids": json.dumps(list(edit_ids)),
            }
        )
        data = {"backend": backend.value, "edit_ids": list(edit_ids)}
        editlog.append(store, EventKind.BATCH_CREATED, batch_id=batch_id, data=data)
    return batch_id


def finish_batch(
    store: Store, batch_id: str, status: BatchStatus | str, error: str | None = None
) -> BatchRecord:
    """Close a running batch as succeeded, partial or failed (``error`` says why)."""
    status = BatchStatus(status)
    if status is BatchStatus.RUNNING:
        raise ValueError("a batch is finished as succeeded, partial or failed, not running")
    with store.write() as db:
        batch = _fetch(store, batch_id)
        if batch.status is not BatchStatus.RUNNING:
            raise StoreError(
                f"batch '{batch_id}' is already finished ({batch.status.value})",
                batch_id=batch_id,
            )
        db.execute(
            "UPDATE batches SET status = ?, finished_at = ?, error = ? WHERE id = ?",
            [status.value, store.now(), error, batch_id],
        )
        data = {"status": status.value, "error": error}
        editlog.append(store, EventKind.BATCH_FINISHED, batch_id=batch_id, data=data)
        return _fetch(store, batch_id)


def get_batch(store: Store, batch_id: str) -> BatchRecord:
    """The batch with ``batch_id``; raises :class:`RecordNotFoundError`."""
    with store.read():
        return _fetch(store, batch_id)


def _fetch(store: Store, batch_id: str) -> BatchRecord:
    for row in store.db.query("SELECT * FROM batches WHERE id = ?", [batch_id]):
        return BatchRecord(
            id=row["id"],
            backend=row["backend"],
            status=BatchStatus(row["status"]),
            created_at=float(row["created_at"]),
            finished_at=None if row["finished_at"] is None else float(row["finished_at"]),
            edit_ids=tuple(json.loads(row["edit_ids"])),
            error=row["error"],
        )
    raise RecordNotFoundError("batch", batch_id)
