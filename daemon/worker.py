"""The worker: claims batches from the queue and turns them into model edits.

One batch, one step (all under the engine's lock):

1. route, apply per back-end (hook first, then MELO with the hook's escalations),
   verify by greedy generation, retract failures and escalate them once: the
   store-free ``daemon.dispatch`` (also what ``editd eval --editor auto`` runs);
2. around each back-end step, record a batch in the store (``store.batches``) and
   extend the batch's leases; an edit that fails everywhere is ``failed`` with
   the reason (no retry: the same input fails the same way);
3. an applied edit's ``supersedes`` target is retracted in the same step, as are
   the earlier edits a back-end reports it replaced (the hook merges facts);
4. acks go to the store only after the model holds the edit, so a crash before
   the ack leaves the edit ``applying`` (taken back at the next start) and a
   crash after it leaves it ``applied`` (replayed from the log at the next start).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.config import Config
from daemon.dispatch import DispatchHooks, DispatchItem, Step, dispatch
from daemon.editors.base import EditSpec
from daemon.engine import Engine, Verification
from daemon.errors import EditdError, InvalidTransitionError
from daemon.router import Route
from store import batches
from store.batches import BatchStatus
from store.db import Store
from store.edits import EditRecord
from store.queue import EditQueue
from store.schema import Backend, EditStatus

log = structlog.get_logger()


def worker_name() -> str:
    """A name unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def spec_of(record: EditRecord) -> EditSpec:
    """What an editor sees of a stored edit (never the locality probes or held-outs)."""
    request = record.request
    if request is None:
        raise EditdError(f"edit '{record.id}' has no valid request (rejected)")
    return EditSpec(
        edit_id=record.id,
        prompt=request.prompt,
        target=request.target,
        subject=request.subject,
        relation=request.relation,
        rephrases=request.rephrases,
    )


@dataclass
class BatchReport:
    """What one batch did: edit id -> back-end for applied ones, reasons for failures."""

    applied: dict[str, Backend] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    escalated: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


@dataclass
class WorkerHooks:
    """Callbacks for metrics and scheduling (all optional)."""

    on_applied: Callable[[EditRecord], None] = lambda record: None
    on_verification_failure: Callable[[Backend], None] = lambda backend: None
    on_batch: Callable[[Backend, str], None] = lambda backend, outcome: None
    on_step: Callable[[Step], None] = lambda step: None
    after_batch: Callable[[BatchReport], None] = lambda report: None


class Worker:
    """Applies queued edits through the engine and records the results."""

    def __init__(
        self,
        store: Store,
        queue: EditQueue,
        engine: Engine,
        config: Config,
        *,
        name: str | None = None,
        hooks: WorkerHooks | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.engine = engine
        self.config = config
        self.name = name or worker_name()
        self.hooks = hooks or WorkerHooks()
        self.last_progress = time.monotonic()
        self._pause = threading.Event()

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Claim and process batches until ``stop`` is set (the current batch finishes)."""
        cfg = self.config.worker
        log.info("worker_started", worker=self.name, batch_size=cfg.batch_size)
        while not stop.is_set():
            self.last_progress = time.monotonic()
            if self._pause.is_set() or not self._batch_ready():
                stop.wait(cfg.poll_interval_s)
                continue
            try:
                self.run_once()
            except Exception:
                log.exception("worker_batch_crashed", worker=self.name)
                stop.wait(cfg.poll_interval_s)
        log.info("worker_stopped", worker=self.name)

    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    def _batch_ready(self) -> bool:
        """A full batch is due, or the oldest due edit has waited ``max_wait_s``."""
        cfg = self.config.worker
        with self.store.read() as db:
            row = db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM edits WHERE status = 'queued' "
                "AND schedule = 'now' AND not_before <= ?",
                [self.store.now()],
            ).fetchone()
        count, oldest = int(row[0]), row[1]
        if count == 0:
            return False
        return count >= cfg.batch_size or self.store.now() - float(oldest) >= cfg.max_wait_s

    def run_once(self) -> BatchReport | None:
        """Claim one batch (if any is due) and process it."""
        cfg = self.config.worker
        records = self.queue.claim(cfg.batch_size, cfg.lease_s, self.name)
        if not records:
            return None
        with self.engine.lock:  # completions see the model before or after the batch
            report = self.process(records)
        self.last_progress = time.monotonic()
        self.hooks.after_batch(report)
        return report

    # --- one batch --------------------------------------------------------------------------

    def process(self, records: Sequence[EditRecord]) -> BatchReport:
        """Apply leased ``records``; every one ends applied, failed or back in the queue."""
        by_id = {r.id: r for r in records}
        items = []
        for r in records:
            assert r.request is not None  # claimed edits are valid requests
            items.append(DispatchItem(spec_of(r), r.request))
        batch_ids: dict[Backend, str] = {}
        batch_of: dict[str, str] = {}

        def before_step(backend: Backend, edit_ids: Sequence[str]) -> None:
            batch_ids[backend] = batches.create_batch(self.store, backend, list(edit_ids))

        def after_step(step: Step) -> None:
            batch_id = batch_ids[step.backend]
            batch_of.update({edit_id: batch_id for edit_id in step.taken})
            status = (
                BatchStatus.SUCCEEDED
                if not step.refused
                else BatchStatus.PARTIAL
                if step.taken
                else BatchStatus.FAILED
            )
            batches.finish_batch(self.store, batch_id, status)
            self.hooks.on_batch(step.backend, status.value)
            self.hooks.on_step(step)
            self._heartbeat(list(by_id))

        hooks = DispatchHooks(before_step, after_step, self.hooks.on_verification_failure)
        result = dispatch(
            self.engine, items, self.config.router, verify=self.config.worker.verify, hooks=hooks
        )
        report = BatchReport(
            applied=result.applied, failed=result.failed, escalated=result.escalated
        )
        self._record(by_id, report, result.routes, result.verifications, batch_of, result.details)
        return report

    def _heartbeat(self, edit_ids: list[str]) -> None:
        """Extend the batch's leases after each back-end step (a slow batch keeps them)."""
        self.last_progress = time.monotonic()
        held = self.queue.heartbeat(self.name, edit_ids, self.config.worker.lease_s)
        if len(held) < len(edit_ids):
            log.warning("leases_lost_mid_batch", lost=sorted(set(edit_ids) - set(held)))

    def _record(
        self,
        by_id: dict[str, EditRecord],
        report: BatchReport,
        routes: dict[str, Route],
        verifications: dict[str, Verification],
        batch_of: dict[str, str],
        details: dict[str, dict[str, Any]],
    ) -> None:
        for edit_id, backend in report.applied.items():
            result: dict[str, Any] = {
                "route": {
                    "backend": routes[edit_id].backend.value,
                    "reason": routes[edit_id].reason,
                },
                "editor": details.get(edit_id, {}),
            }
            if edit_id in verifications:
                result["verification"] = verifications[edit_id].to_json_dict()
            try:
                record = self.queue.ack(
                    edit_id, self.name, backend=backend, batch_id=batch_of[edit_id], result=result
                )
            except EditdError:
                log.warning("lease_lost_after_apply", edit_id=edit_id, worker=self.name)
                self.engine.retract(backend, [edit_id])
                report.lost.append(edit_id)
                continue
            self.hooks.on_applied(record)
            replaced = list(details.get(edit_id, {}).get("superseded", []))
            request = by_id[edit_id].request
            if request is not None and request.supersedes:
                replaced.append(request.supersedes)
            for old in dict.fromkeys(replaced):
                if old != edit_id and self._supersede(old, edit_id):
                    report.superseded.append(old)
        for edit_id, reason in report.failed.items():
            try:
                self.queue.fail(edit_id, self.name, reason, retry=False)
            except EditdError:
                report.lost.append(edit_id)

    def _supersede(self, old: str, new: str) -> bool:
        """Retract ``old`` (from the model if applied) in favour of ``new``."""
        try:
            record = self.queue.get(old)
        except EditdError:
            log.warning("supersedes_unknown_edit", edit_id=new, supersedes=old)
            return False
        reason = f"superseded by {new}"
        try:
            if record.status is EditStatus.APPLIED:
                if record.backend:
                    self.engine.retract(Backend(record.backend), [old])
                self.queue.transition(old, EditStatus.SUPERSEDED, reason=reason, data={"by": new})
            elif record.status in (EditStatus.QUEUED, EditStatus.FAILED, EditStatus.QUARANTINED):
                self.queue.transition(old, EditStatus.RETRACTED, reason=reason, data={"by": new})
            else:
                return False
        except InvalidTransitionError:
            return False
        log.info("edit_superseded", edit_id=old, by=new)
        return True
