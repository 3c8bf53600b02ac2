"""The durable edit queue: submit, claim with a lease, heartbeat, ack, fail, release.

Every method is one transaction that also appends its events to the event log.
A worker holds an edit while it is ``applying`` under the worker's name: an
expired lease stays usable until :meth:`EditQueue.requeue_expired` (which
:meth:`EditQueue.claim` also runs first) takes the edit back, after which
:meth:`~EditQueue.ack` and :meth:`~EditQueue.fail` raise :class:`LeaseLostError`.
Worker names must be unique per process (e.g. ``host:pid:random``).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import structlog
from sqlite_utils import Database

from daemon.errors import ConfigError, InvalidTransitionError, LeaseLostError
from store import editlog, edits, intake
from store.db import Store
from store.editlog import EventKind
from store.edits import EditRecord
from store.intake import EnqueueResult
from store.schema import (
    Backend,
    EditKind,
    EditRequest,
    EditStatus,
    RequestLimits,
    Schedule,
    SourceKind,
    can_transition,
)

__all__ = ["EditQueue", "EditRecord", "EnqueueResult", "QueuePolicy"]

log = structlog.get_logger()

_DEFAULT_LIMITS = RequestLimits()
_TRANSITION_EVENTS = {
    EditStatus.QUEUED: EventKind.EDIT_REQUEUED,
    EditStatus.APPLYING: EventKind.EDIT_REAPPLY_STARTED,
    EditStatus.APPLIED: EventKind.EDIT_APPLIED,
    EditStatus.FAILED: EventKind.EDIT_FAILED,
    EditStatus.RETRACTED: EventKind.EDIT_RETRACTED,
    EditStatus.SUPERSEDED: EventKind.EDIT_SUPERSEDED,
    EditStatus.QUARANTINED: EventKind.EDIT_QUARANTINED,
}

_RETRACTABLE_UNAPPLIED = frozenset({EditStatus.QUEUED, EditStatus.FAILED, EditStatus.QUARANTINED})
"""States of a superseded edit that the model does not hold: it is retracted instead."""


@dataclass(frozen=True)
class QueuePolicy:
    """Retry rules: attempts per edit and exponential back-off between them."""

    max_attempts: int = 3
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError(f"must be an integer, got {self.max_attempts!r}", key="max_attempts")
        if self.max_attempts < 1:
            raise ConfigError(f"must be at least 1, got {self.max_attempts}", key="max_attempts")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"must be a number >= 0, got {value!r}", key=f.name)
        if self.backoff_max_s < self.backoff_base_s:
            raise ConfigError(
                f"must be >= backoff_base_s ({self.backoff_base_s}), got {self.backoff_max_s}",
                key="backoff_max_s",
            )

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next try after ``attempts`` tries: base * 2**(attempts-1), capped."""
        exponent = min(max(attempts - 1, 0), 60)
        return float(min(self.backoff_max_s, self.backoff_base_s * 2**exponent))


class EditQueue:
    """The queue of edits in one :class:`Store`."""

    def __init__(self, store: Store, policy: QueuePolicy | None = None) -> None:
        self.store = store
        self.policy = policy if policy is not None else QueuePolicy()

    # --- intake ---------------------------------------------------------------------

    def submit(
        self,
        raw: object,
        *,
        limits: RequestLimits = _DEFAULT_LIMITS,
        source_kind: SourceKind | str = SourceKind.API,
    ) -> EnqueueResult:
        """Validate and store one request; bad input is stored as ``rejected``, never raised."""
        return self.submit_many([raw], limits=limits, source_kind=source_kind)[0]

    def submit_many(
        self,
        raws: Iterable[object],
        *,
        limits: RequestLimits = _DEFAULT_LIMITS,
        source_kind: SourceKind | str = SourceKind.API,
    ) -> builtins.list[EnqueueResult]:
        """:meth:`submit` for several requests in one transaction."""
        kind = SourceKind(source_kind)
        with self.store.write():
            results = [
                intake.submit(self.store, raw, limits=limits, source_kind=kind) for raw in raws
            ]
        _log_results(results, kind.value)
        return results

    def enqueue(
        self, request: EditRequest, *, limits: RequestLimits = _DEFAULT_LIMITS
    ) -> EnqueueResult:
        """Store an already-built request (validated again; rejected if invalid)."""
        result = intake.enqueue(self.store, request, limits=limits)
        _log_results([result], request.source.kind.value)
        return result

    # --- workers --------------------------------------------------------------------

    def claim(
        self,
        n: int,
        lease_s: float,
        worker: str,
        *,
        schedules: Sequence[Schedule] = (Schedule.NOW,),
    ) -> builtins.list[EditRecord]:
        """Take up to ``n`` due ``queued`` edits in queue order and lease them to ``worker``."""
        _check_lease(lease_s)
        if n < 1 or not schedules:
            return []
        marks = ", ".join("?" for _ in schedules)
        with self.store.write() as db:
            now = self.store.now()
            self._expire(db, now)
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM edits WHERE status = 'queued' AND schedule IN ({marks}) "
                    "AND not_before <= ? ORDER BY seq LIMIT ?",
                    [*(Schedule(s).value for s in schedules), now, n],
                )
            ]
            claimed = [self._lease(db, edit_id, worker, now + lease_s) for edit_id in ids]
        if claimed:
            log.info("edits_claimed", worker=worker, edit_ids=ids, lease_s=lease_s)
        return claimed

    def heartbeat(self, worker: str, edit_ids: Iterable[str], lease_s: float) -> builtins.list[str]:
        """Extend ``worker``'s leases on ``edit_ids``; return the ids it still holds."""
        _check_lease(lease_s)
        held: builtins.list[str] = []
        with self.store.write() as db:
            expires = self.store.now() + lease_s
            for edit_id in edit_ids:
                cursor = db.execute(
                    "UPDATE edits SET lease_expires = ?, updated_at = ? "
                    "WHERE id = ? AND status = 'applying' AND lease_owner = ?",
                    [expires, self.store.now(), edit_id, worker],
                )
                if cursor.rowcount:
                    held.append(edit_id)
        return held

    def ack(
        self,
        edit_id: str,
        worker: str,
        *,
        backend: Backend | str,
        batch_id: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> EditRecord:
        """Mark a leased edit ``applied`` by ``backend``; raises :class:`LeaseLostError`."""
        return self.ack_replacing(
            edit_id, worker, backend=backend, batch_id=batch_id, result=result, replaces=()
        )[0]

    def ack_replacing(
        self,
        edit_id: str,
        worker: str,
        *,
        backend: Backend | str,
        batch_id: str | None = None,
        result: dict[str, Any] | None = None,
        replaces: Sequence[str],
    ) -> tuple[EditRecord, builtins.list[str]]:
        """:meth:`ack`, and in the same transaction retire the edits it ``replaces`` (its
        ``supersedes`` target, and earlier edits an editor replaced): an ``applied`` one
        becomes ``superseded``; a ``queued``, ``failed`` or ``quarantined`` one
        ``retracted``; unknown ids and edits in other states are left alone. Either all of
        it is stored or none. Returns the acked record and the ids retired."""
        backend = Backend(backend)
        retired: builtins.list[str] = []
        with self.store.write() as db:
            for old in dict.fromkeys(replaces):
                if old != edit_id and self._retire(db, old, edit_id):
                    retired.append(old)
            record = self._held(db, edit_id, worker)
            edits.update(
                db,
                edit_id,
                self.store.now(),
                status=EditStatus.APPLIED,
                backend=backend.value,
                batch_id=batch_id,
                result_json=None if result is None else _json(result),
                applied_at=self.store.now(),
                lease_owner=None,
                lease_expires=None,
                error=None,
            )
            data = {"worker": worker, "backend": backend.value, "attempts": record.attempts}
            editlog.append(
                self.store, EventKind.EDIT_APPLIED, edit_id=edit_id, batch_id=batch_id, data=data
            )
            updated = edits.fetch_existing(db, edit_id)
        log.info("edit_applied", edit_id=edit_id, batch_id=batch_id, backend=backend.value)
        for old in retired:
            log.info("edit_superseded", edit_id=old, by=edit_id)
        return updated, retired

    def fail(self, edit_id: str, worker: str, reason: str, *, retry: bool = True) -> EditRecord:
        """Give a leased edit back after a failure: retried after a back-off, or ``failed``.

        The edit fails for good when ``retry`` is false or its attempts reach
        ``policy.max_attempts``. Raises :class:`LeaseLostError`.
        """
        with self.store.write() as db:
            record = self._held(db, edit_id, worker)
            data = {"worker": worker, "reason": reason, "attempts": record.attempts}
            self._retry_or_fail(db, record, edits.storable(reason, 4096), retry, data)
            updated = edits.fetch_existing(db, edit_id)
        log.info(
            "edit_failed" if updated.status is EditStatus.FAILED else "edit_requeued",
            edit_id=edit_id,
            worker=worker,
            reason=reason,
            attempts=record.attempts,
        )
        return updated

    def release(self, edit_id: str, worker: str) -> EditRecord:
        """Give a leased edit back unharmed (graceful shutdown): queued, attempt not counted."""
        with self.store.write() as db:
            record = self._held(db, edit_id, worker)
            now = self.store.now()
            edits.update(
                db,
                edit_id,
                now,
                status=EditStatus.QUEUED,
                attempts=max(record.attempts - 1, 0),
                not_before=now,
                lease_owner=None,
                lease_expires=None,
            )
            editlog.append(
                self.store, EventKind.EDIT_RELEASED, edit_id=edit_id, data={"worker": worker}
            )
            updated = edits.fetch_existing(db, edit_id)
        log.info("edit_released", edit_id=edit_id, worker=worker)
        return updated

    def requeue_expired(self) -> int:
        """Take back every ``applying`` edit whose lease has expired; return how many."""
        with self.store.write() as db:
            count = self._expire(db, self.store.now())
        return count

    def release_schedule(self, schedule: Schedule) -> int:
        """Make every queued edit of ``schedule`` claimable now; return how many."""
        return len(self.release_schedule_ids(schedule))

    def release_schedule_ids(self, schedule: Schedule) -> builtins.list[str]:
        """Make every queued edit of ``schedule`` claimable now, in one transaction; their
        ids in queue order."""
        schedule = Schedule(schedule)
        if schedule is Schedule.NOW:
            return []
        with self.store.write() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM edits WHERE status = 'queued' AND schedule = ? ORDER BY seq",
                    [schedule.value],
                )
            ]
            for edit_id in ids:
                edits.update(db, edit_id, self.store.now(), schedule=Schedule.NOW)
                data = {"schedule": schedule.value}
                editlog.append(
                    self.store, EventKind.EDIT_SCHEDULE_RELEASED, edit_id=edit_id, data=data
                )
        log.info("schedule_released", schedule=schedule.value, count=len(ids))
        return ids

    # --- administration -------------------------------------------------------------

    def transition(
        self,
        edit_id: str,
        to: EditStatus,
        *,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> EditRecord:
        """Move an edit to state ``to`` if :data:`ALLOWED_TRANSITIONS` allows it.

        Raises :class:`InvalidTransitionError` or :class:`EditNotFoundError`.
        """
        to = EditStatus(to)
        with self.store.write() as db:
            record = edits.fetch_existing(db, edit_id)
            if not can_transition(record.status, to):
                raise InvalidTransitionError(edit_id, record.status.value, to.value)
            self._move(db, record, to, reason, data)
            updated = edits.fetch_existing(db, edit_id)
        log.info("edit_transitioned", edit_id=edit_id, old=record.status.value, new=to.value)
        return updated

    def get(self, edit_id: str) -> EditRecord:
        """The record with ``edit_id``; raises :class:`EditNotFoundError`."""
        with self.store.read() as db:
            return edits.fetch_existing(db, edit_id)

    def counts(self) -> dict[str, int]:
        """Number of edits in each state (every state present, zeros included)."""
        with self.store.read() as db:
            return edits.counts(db)

    def counts_by_backend(self) -> dict[tuple[str, str], int]:
        """Number of edits per ``(status, backend)`` (``backend`` ``""`` where unset)."""
        with self.store.read() as db:
            return edits.counts_by_backend(db)

    def applied_by_backend(self) -> dict[str, int]:
        """Number of ``applied`` edits per back-end."""
        applied = EditStatus.APPLIED.value
        return {b: n for (s, b), n in self.counts_by_backend().items() if s == applied}

    def in_status(self, status: EditStatus) -> builtins.list[EditRecord]:
        """Every edit in ``status``, in the order it reached it (for ``applied``: the order
        the model received them)."""
        with self.store.read() as db:
            return edits.in_status(db, status)

    def due(self) -> tuple[int, float | None]:
        """How many ``queued`` edits are due now (schedule ``now``), and the oldest's
        ``created_at`` (``None`` when there are none)."""
        with self.store.read() as db:
            row = db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM edits WHERE status = 'queued' "
                "AND schedule = 'now' AND not_before <= ?",
                [self.store.now()],
            ).fetchone()
        return int(row[0]), None if row[1] is None else float(row[1])

    def depth(self) -> int:
        """Edits waiting or in progress: ``queued`` plus ``applying``."""
        counts = self.counts()
        return counts[EditStatus.QUEUED.value] + counts[EditStatus.APPLYING.value]

    def list(
        self,
        status: EditStatus | None = None,
        limit: int = 50,
        after: str | None = None,
        kind: EditKind | None = None,
    ) -> builtins.list[EditRecord]:
        """A page of records in queue order, of one ``status`` and ``kind`` when given;
        ``after`` is the last id of the previous page."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where: builtins.list[str] = ["1 = 1"]
        params: builtins.list[Any] = []
        with self.store.read() as db:
            if after is not None:
                where.append("seq > ?")
                params.append(edits.fetch_existing(db, after).seq)
            if status is not None:
                where.append("status = ?")
                params.append(EditStatus(status).value)
            if kind is not None:
                where.append("kind = ?")
                params.append(EditKind(kind).value)
            return edits.fetch_many(db, " AND ".join(where), params, limit)

    # --- internals ------------------------------------------------------------------

    def _move(
        self,
        db: Database,
        record: EditRecord,
        to: EditStatus,
        reason: str | None,
        data: dict[str, Any] | None,
    ) -> None:
        edits.update(db, record.id, self.store.now(), **self._transition_values(to, reason))
        payload = {**(data or {}), "from": record.status.value, "reason": reason}
        editlog.append(self.store, _TRANSITION_EVENTS[to], edit_id=record.id, data=payload)

    def _retire(self, db: Database, old: str, by: str) -> bool:
        """Supersede (applied) or retract (not applied yet) ``old`` in favour of ``by``."""
        record = edits.fetch(db, old)
        if record is None:
            return False
        if record.status is EditStatus.APPLIED:
            to = EditStatus.SUPERSEDED
        elif record.status in _RETRACTABLE_UNAPPLIED:
            to = EditStatus.RETRACTED
        else:
            return False
        self._move(db, record, to, f"superseded by {by}", {"by": by})
        return True

    def _held(self, db: Database, edit_id: str, worker: str) -> EditRecord:
        record = edits.fetch_existing(db, edit_id)
        if record.status is not EditStatus.APPLYING or record.lease_owner != worker:
            raise LeaseLostError(edit_id, worker)
        return record

    def _lease(self, db: Database, edit_id: str, worker: str, expires: float) -> EditRecord:
        db.execute(
            "UPDATE edits SET status = 'applying', lease_owner = ?, lease_expires = ?, "
            "attempts = attempts + 1, updated_at = ? WHERE id = ?",
            [worker, expires, self.store.now(), edit_id],
        )
        record = edits.fetch_existing(db, edit_id)
        data = {"worker": worker, "lease_expires": expires, "attempt": record.attempts}
        editlog.append(self.store, EventKind.EDIT_CLAIMED, edit_id=edit_id, data=data)
        return record

    def _retry_or_fail(
        self, db: Database, record: EditRecord, reason: str, retry: bool, data: dict[str, Any]
    ) -> None:
        now = self.store.now()
        if retry and record.attempts < self.policy.max_attempts:
            not_before = now + self.policy.backoff_s(record.attempts)
            status, kind = EditStatus.QUEUED, EventKind.EDIT_REQUEUED
            data = {**data, "not_before": not_before}
        else:
            not_before, status, kind = record.not_before, EditStatus.FAILED, EventKind.EDIT_FAILED
        edits.update(
            db,
            record.id,
            now,
            status=status,
            not_before=not_before,
            error=reason,
            lease_owner=None,
            lease_expires=None,
        )
        editlog.append(self.store, kind, edit_id=record.id, data=data)

    def _expire(self, db: Database, now: float) -> int:
        expired = edits.fetch_many(
            db, "status = 'applying' AND lease_expires <= ?", [now], limit=-1
        )
        for record in expired:
            data = {"worker": record.lease_owner, "attempts": record.attempts}
            editlog.append(self.store, EventKind.LEASE_EXPIRED, edit_id=record.id, data=data)
            reason = (
                f"lease expired after {record.attempts} attempts"
                if record.attempts >= self.policy.max_attempts
                else f"lease held by '{record.lease_owner}' expired"
            )
            self._retry_or_fail(db, record, reason, True, {**data, "reason": reason})
        if expired:
            log.warning("leases_expired", edit_ids=[r.id for r in expired])
        return len(expired)

    def _transition_values(self, to: EditStatus, reason: str | None) -> dict[str, Any]:
        values: dict[str, Any] = {"status": to, "lease_owner": None, "lease_expires": None}
        if to is EditStatus.QUEUED:
            values["not_before"] = self.store.now()
        if to is EditStatus.APPLIED:
            values["applied_at"] = self.store.now()
        if reason is not None:
            values["error"] = edits.storable(reason, 4096)
        return values


def _check_lease(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)


def _log_results(results: Sequence[EnqueueResult], source_kind: str) -> None:
    for result in results:
        if result.status is EditStatus.REJECTED:
            log.info("edit_rejected", edit_id=result.id, reason=result.reason, source=source_kind)
        elif result.created:
            log.info("edit_enqueued", edit_id=result.id, source=source_kind)
        else:
            log.debug("edit_deduplicated", edit_id=result.id, status=result.status.value)
