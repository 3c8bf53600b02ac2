"""Intake: turn raw input into a queued or a rejected edit, idempotently.

Rules (applied under the caller's write transaction):

- Invalid input is stored as ``rejected`` with its reason and raw text, under a
  generated id; the client's id goes to ``client_id`` and stays free for reuse.
- A client ``id`` is the edit id. The same id with the same content returns the
  existing record (``created=False``); with different content the new request is
  stored as ``rejected`` ("id 'X' was already used for a different request").
- Without a client id, a request whose content hash matches a live edit
  (queued, applying, applied, quarantined) returns that edit (``created=False``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.errors import EditValidationError, IdempotencyConflictError
from store import editlog, edits
from store.editlog import EventKind
from store.schema import EditRequest, EditSource, EditStatus, RequestLimits, SourceKind
from store.validation import parse_edit_json, parse_edit_request

if TYPE_CHECKING:
    from store.db import Store

_MAX_SNIFF_CHARS = 1 << 20  # larger rejected input is not parsed again for its id


@dataclass(frozen=True)
class EnqueueResult:
    """What happened to one submitted request."""

    id: str
    status: EditStatus
    created: bool
    reason: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {
            "id": self.id,
            "status": self.status.value,
            "created": self.created,
            "reason": self.reason,
        }


def submit(
    store: Store, raw: object, *, limits: RequestLimits, source_kind: SourceKind
) -> EnqueueResult:
    """Validate ``raw`` (a decoded JSON value, or JSON text as str/bytes) and store it."""
    default_source = EditSource(kind=source_kind)
    try:
        if isinstance(raw, str | bytes | bytearray):
            request = parse_edit_json(raw, limits=limits, default_source=default_source)
        else:
            request = parse_edit_request(raw, limits=limits, default_source=default_source)
    except EditValidationError as exc:
        return reject(store, raw, exc, client_id=client_id_of(raw), source_kind=source_kind)
    return _enqueue_valid(store, request, source_kind.value)


def enqueue(store: Store, request: EditRequest, *, limits: RequestLimits) -> EnqueueResult:
    """Store an :class:`EditRequest` built in code; it is validated again on the way in."""
    try:
        checked = parse_edit_request(
            request.to_json_dict(), limits=limits, default_source=request.source
        )
    except (EditValidationError, TypeError, ValueError, AttributeError) as exc:
        reason = exc if isinstance(exc, EditValidationError) else EditValidationError(str(exc))
        client_id = request.id if isinstance(request.id, str) else None
        return reject(store, request, reason, client_id=client_id, source_kind=SourceKind.API)
    return _enqueue_valid(store, checked, checked.source.kind.value)


def reject(
    store: Store,
    raw: object,
    error: EditValidationError | IdempotencyConflictError,
    *,
    client_id: str | None,
    source_kind: SourceKind | str,
) -> EnqueueResult:
    """Store ``raw`` as a ``rejected`` edit with the error's message as its reason."""
    edit_id = uuid.uuid4().hex
    reason = edits.storable(str(error), 4096)
    kind = SourceKind(source_kind).value
    with store.write() as db:
        row = edits.rejected_row(edit_id, raw_text(raw), reason, client_id, kind, store.now())
        edits.insert(db, row)
        field = getattr(error, "field", None)
        data = {"reason": reason, "field": field, "client_id": row["client_id"]}
        editlog.append(store, EventKind.EDIT_REJECTED, edit_id=edit_id, data=data)
    return EnqueueResult(edit_id, EditStatus.REJECTED, created=True, reason=reason)


def _enqueue_valid(store: Store, request: EditRequest, source_kind: str) -> EnqueueResult:
    content_hash = request.content_hash()
    with store.write() as db:
        if request.id is not None:
            existing = edits.fetch(db, request.id)
            if existing is not None and existing.content_hash != content_hash:
                conflict = IdempotencyConflictError(request.id)
                return reject(
                    store,
                    request.to_json_dict(),
                    conflict,
                    client_id=request.id,
                    source_kind=source_kind,
                )
        else:
            existing = edits.find_live_by_hash(db, content_hash)
        if existing is not None:
            return EnqueueResult(existing.id, existing.status, created=False)
        edit_id = request.id or uuid.uuid4().hex
        edits.insert(db, edits.request_row(request, edit_id, source_kind, store.now()))
        data = {
            "client_id": request.id,
            "content_hash": content_hash,
            "schedule": request.schedule.value,
            "backend_requested": request.backend.value,
            "source_kind": source_kind,
        }
        editlog.append(store, EventKind.EDIT_ENQUEUED, edit_id=edit_id, data=data)
    return EnqueueResult(edit_id, EditStatus.QUEUED, created=True)


def raw_text(raw: object) -> str:
    """The input as text for a rejected record: JSON when possible, else ``repr``."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8", "backslashreplace")
    if isinstance(raw, EditRequest):
        raw = raw.__dict__
    try:
        return json.dumps(raw, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(raw)


def client_id_of(raw: object) -> str | None:
    """The ``id`` a client gave in otherwise invalid input, if it is a string."""
    if isinstance(raw, str | bytes | bytearray):
        if len(raw) > _MAX_SNIFF_CHARS:
            return None
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if isinstance(raw, Mapping):
        value = raw.get("id")
        if isinstance(value, str) and value:
            return edits.storable(value, 800)
    return None
