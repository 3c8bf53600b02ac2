"""The worker: claims batches from the queue and turns them into model edits.

One batch, one step (all under the engine's lock):

1. **Screen.** An edit whose ``supersedes`` names an edit its source may not
   replace (``store.ownership``: a feed only its own edits) fails with the reason;
   one whose target another batch is applying right now goes back to the queue to
   wait for it (a retry after the back-off).
2. **Order.** An edit whose ``supersedes`` target is in the same batch goes in a
   round after its target's, so the target is applied (or failed) first and then
   replaced like any applied edit.
3. **Apply** each round: take the ``supersedes`` targets the model holds out of
   it, then route, apply per back-end (hook first, then MELO with the hook's
   escalations), verify by greedy generation, retract failures and escalate them
   once: the store-free ``daemon.engine.dispatch`` (also what ``editd eval --editor
   auto`` runs). Taking the old edit out first lets the new one take its prompt on
   any back-end (MELO refuses a prompt that another edit holds). Around each
   back-end step a batch is recorded in the store (``store.batches``) and the
   leases are extended.
4. **Record.** An applied edit is acked in one transaction together with the edits
   it replaces (its ``supersedes`` target, and those a back-end replaced on its
   own: the hook merges edits of one fact, which are checked against the same
   ownership rule), which become ``superseded``. An edit that fails everywhere is
   ``failed`` with the reason (no retry: the same input fails the same way); a
   feed's failed edit also records the reason on its feed item.
5. **Restore.** An earlier edit that left the model in this round (taken out, or
   replaced by a back-end) without an acked edit replacing it is applied again on
   its back-end, so a superseding edit that fails leaves the old one in force (and
   its feed item's slot points at the old one again). One that cannot be applied
   again goes to ``failed`` through ``quarantined``, with the reason.

The model and the store agree after any failure: an edit is acked only once the
model holds it; one whose ack fails (lease lost, database error) is retracted from
the model again and what it replaced is restored; a round that raises half-way is
undone in the model the same way, and the batch's unfinished edits go back to the
queue. A crash leaves an edit ``applying`` (taken back at the next start) or
``applied`` (replayed from the log at the next start).

The loop survives errors: a failed iteration (a database error, say) is logged and
retried after a back-off that doubles from ``poll_interval_s`` per failure in a
row, capped at ``backoff_max_s`` and a quarter of ``lease_s``. ``last_progress``
moves at every iteration and back-end step; the health check reads it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import structlog

from daemon.config import Config, KindsConfig
from daemon.editors.base import EditOutcome, EditSpec
from daemon.engine.dispatch import DispatchHooks, DispatchItem, DispatchResult, Step, dispatch
from daemon.engine.engine import Engine
from daemon.engine.kinds import Expectation, expectation, spec_for, withheld_of
from daemon.errors import (
    EditdError,
    EditNotFoundError,
    LeaseLostError,
    SupersedeNotAllowedError,
)
from store import batches
from store import feeds as feed_store
from store.batches import BatchStatus
from store.db import Store
from store.edits import EditRecord
from store.ownership import Origin, check_may_replace, origin_of
from store.queue import EditQueue
from store.schema import Backend, EditStatus, SourceKind

log = structlog.get_logger()


def worker_name() -> str:
    """A name unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def spec_of(record: EditRecord, kinds: KindsConfig) -> EditSpec:
    """What an editor sees of a stored edit (never the locality probes or held-outs)."""
    request = record.request
    if request is None:
        raise EditdError(f"edit '{record.id}' has no valid request (rejected)")
    return spec_for(record.id, request, kinds)


def expectations_of(records: Sequence[EditRecord]) -> dict[str, Expectation]:
    """What verifying each stored edit checks again (a ``forget``: that the answer its
    record says it withholds stays absent)."""
    return {
        r.id: expectation(r.request, withheld_of(r.result))
        for r in records
        if r.request is not None
    }


def supersedes_of(record: EditRecord) -> str | None:
    """The edit ``record`` replaces (its request's ``supersedes``), never itself."""
    target = record.request.supersedes if record.request is not None else None
    return None if target == record.id else target


def supersede_rounds(records: Sequence[EditRecord]) -> list[list[EditRecord]]:
    """``records`` split into rounds, each in batch order: an edit whose ``supersedes``
    target is in the batch comes a round after the target (a chain takes a round per
    link; the members of a cycle share one)."""
    by_id = {r.id: r for r in records}

    def depth(record: EditRecord, seen: frozenset[str]) -> int:
        target = supersedes_of(record)
        if target is None or target not in by_id or target in seen:
            return 0
        return 1 + depth(by_id[target], seen | {record.id})

    depths = [depth(r, frozenset()) for r in records]
    return [
        [r for r, d in zip(records, depths, strict=True) if d == n] for n in sorted(set(depths))
    ]


@dataclass
class BatchReport:
    """What one batch did: edit id -> back-end for applied ones, reasons for failures."""

    applied: dict[str, Backend] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    escalated: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # back in the queue, waiting
    restored: list[str] = field(default_factory=list)  # earlier edits applied again

    def pending(self, edit_ids: Sequence[str]) -> list[str]:
        """Those of ``edit_ids`` that this batch has not settled yet (still leased)."""
        settled = {*self.applied, *self.failed, *self.lost, *self.deferred}
        return [e for e in edit_ids if e not in settled]


@dataclass
class _Round:
    """One round of a batch, and what the model held before it."""

    records: dict[str, EditRecord]
    before: dict[str, Backend]  # edit id -> back-end, every edit the model held
    taken_out: dict[str, EditRecord] = field(default_factory=dict)  # target id -> record
    replaced: set[str] = field(default_factory=set)  # earlier edits an acked edit replaced
    refused: dict[str, str] = field(default_factory=dict)  # applied, then refused here


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
        self.failures = 0  # loop iterations that failed in a row
        self._pause = threading.Event()

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Claim and process batches until ``stop`` is set (the current batch finishes)."""
        log.info("worker_started", worker=self.name, batch_size=self.config.worker.batch_size)
        try:
            while not stop.is_set():
                self._iterate(stop)
        except BaseException as exc:  # the thread ends: say so (the health check sees it)
            log.critical("worker_died", worker=self.name, error=f"{type(exc).__name__}: {exc}")
            raise
        log.info("worker_stopped", worker=self.name)

    def _iterate(self, stop: threading.Event) -> None:
        """One turn of the loop: a batch if one is due, else a wait; errors back off."""
        self.last_progress = time.monotonic()
        try:
            if self._pause.is_set() or not self._batch_ready():
                stop.wait(self.config.worker.poll_interval_s)
            else:
                self.run_once()
        except Exception as exc:
            self.failures += 1
            delay = self.retry_in_s()
            log.exception(
                "worker_iteration_failed",
                worker=self.name,
                failures=self.failures,
                retry_in_s=delay,
                error=f"{type(exc).__name__}: {exc}",
            )
            stop.wait(delay)
            return
        if self.failures:
            log.info("worker_recovered", worker=self.name, failures=self.failures)
            self.failures = 0

    def retry_in_s(self) -> float:
        """The wait after ``failures`` failed iterations in a row (see the module doc);
        short of the lease, so a worker that waits out an error is not taken for stuck."""
        cfg = self.config.worker
        doubled = cfg.poll_interval_s * 2 ** min(self.failures, 30)
        return float(min(doubled, cfg.backoff_max_s, cfg.lease_s / 4))

    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    def _batch_ready(self) -> bool:
        """A full batch is due, or the oldest due edit has waited ``max_wait_s``."""
        cfg = self.config.worker
        count, oldest = self.queue.due()
        if count == 0 or oldest is None:
            return False
        return count >= cfg.batch_size or self.store.now() - oldest >= cfg.max_wait_s

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
        """Apply leased ``records``; every one ends applied, failed or back in the queue.

        Call with ``engine.lock`` held. An exception (a database error, say) leaves the
        model as the store describes it; the batch's unfinished edits are given back
        to the queue (as far as the store allows) and the exception propagates.
        """
        report = BatchReport()
        held = [r.id for r in records]
        try:
            for group in supersede_rounds(self._screen(records, report)):
                self._process_round(group, held, report)
        except Exception as exc:
            self._give_back(report.pending(held), f"batch interrupted: {type(exc).__name__}: {exc}")
            raise
        return report

    def _screen(self, records: Sequence[EditRecord], report: BatchReport) -> list[EditRecord]:
        """Fail the edits whose ``supersedes`` their source may not replace, send back
        those whose target another batch is applying; the others, in order."""
        in_batch = {r.id for r in records}
        ready = []
        for record in records:
            target = supersedes_of(record)
            if target is not None:
                try:
                    self._check_replace(record.id, target)
                except SupersedeNotAllowedError as exc:
                    log.warning("supersede_refused", edit_id=record.id, supersedes=target)
                    self._fail(record.id, str(exc), report)
                    continue
                status = self._status(target)
                if status is None:
                    log.warning("supersedes_unknown_edit", edit_id=record.id, supersedes=target)
                elif status is EditStatus.APPLYING and target not in in_batch:
                    reason = f"waits for edit '{target}' (its supersedes), being applied elsewhere"
                    self._fail(record.id, reason, report, retry=True)
                    continue
            ready.append(record)
        return ready

    def _process_round(
        self, records: Sequence[EditRecord], held: Sequence[str], report: BatchReport
    ) -> None:
        rnd = _Round({r.id: r for r in records}, self._model_holds())
        items = []
        for r in records:
            assert r.request is not None  # claimed edits are valid requests
            items.append(DispatchItem(spec_of(r, self.engine.kinds), r.request))
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
            self._heartbeat(report.pending(held))

        hooks = DispatchHooks(before_step, after_step, self.hooks.on_verification_failure)
        try:
            self._take_out(rnd)
            result = dispatch(
                self.engine,
                items,
                self.config.router,
                verify=self.config.worker.verify,
                hooks=hooks,
            )
            report.escalated.extend(result.escalated)
            self._acknowledge(rnd, result, batch_of, report)
        except Exception:
            self._undo(rnd, report)
            raise
        self._restore(rnd, report)
        for edit_id, reason in {**result.failed, **rnd.refused}.items():
            target = supersedes_of(rnd.records[edit_id])
            if target is not None and target in report.restored:
                reason += f" (edit '{target}', which it supersedes, stays applied)"
            self._fail(edit_id, reason, report, kept=target)

    # --- supersedes: take out, acknowledge, restore ---------------------------------------

    def _take_out(self, rnd: _Round) -> None:
        """Retract the round's ``supersedes`` targets from the model before applying."""
        for record in rnd.records.values():
            target = supersedes_of(record)
            if target is None or target not in rnd.before or target in rnd.taken_out:
                continue
            old = self.queue.get(target)
            if old.status is EditStatus.APPLIED:
                self.engine.retract(rnd.before[target], [target])
                rnd.taken_out[target] = old
                log.info("edit_taken_out", edit_id=target, by=record.id)

    def _acknowledge(
        self,
        rnd: _Round,
        result: DispatchResult,
        batch_of: dict[str, str],
        report: BatchReport,
    ) -> None:
        """Ack each applied edit with the edits it replaces, in one transaction each."""
        for edit_id, backend in result.applied.items():
            details = result.details.get(edit_id, {})
            target = supersedes_of(rnd.records[edit_id])
            merged = [e for e in details.get("superseded", []) if e != edit_id]
            replaces = list(dict.fromkeys([*merged, *([target] if target else [])]))
            try:
                for old in merged:  # the back-end replaced these on its own
                    self._check_replace(edit_id, old)
            except SupersedeNotAllowedError as exc:
                self.engine.retract(backend, [edit_id])
                rnd.refused[edit_id] = f"applying it replaced an earlier edit (same fact): {exc}"
                continue
            try:
                record, retired = self.queue.ack_replacing(
                    edit_id,
                    self.name,
                    backend=backend,
                    batch_id=batch_of.get(edit_id),
                    result=_result_json(edit_id, result),
                    replaces=replaces,
                )
            except Exception as exc:  # lease lost, or the database failed
                self.engine.retract(backend, [edit_id])
                report.lost.append(edit_id)
                if isinstance(exc, LeaseLostError):
                    log.warning("lease_lost_after_apply", edit_id=edit_id, worker=self.name)
                else:
                    log.exception("edit_ack_failed", edit_id=edit_id, backend=backend.value)
                    self._give_back([edit_id], f"recording it failed: {type(exc).__name__}: {exc}")
                continue
            rnd.replaced.update(replaces)
            report.applied[edit_id] = backend
            report.superseded.extend(retired)
            for old in retired:  # the store retired it: the model must not hold it either
                holder = self.engine.backend_of(old)
                if holder is not None:
                    self.engine.retract(holder, [old])
            self.hooks.on_applied(record)

    def _undo(self, rnd: _Round, report: BatchReport) -> None:
        """A round raised half-way: retract what it applied and did not ack, restore
        what it took out. Errors here are logged: the original one propagates."""
        try:
            unacked = [e for e in rnd.records if e not in report.applied]
            for backend in self.engine.backends:
                self.engine.retract(backend, unacked)
            self._restore(rnd, report)
            log.warning("batch_round_undone", edit_ids=unacked, restored=report.restored)
        except Exception:
            log.exception("batch_round_undo_failed", edit_ids=list(rnd.records))

    def _restore(self, rnd: _Round, report: BatchReport) -> None:
        """Apply again, on its back-end, every edit the model held before the round and
        lost in it without an acked edit replacing it."""
        now = self._model_holds()
        missing = [(e, b) for e, b in rnd.before.items() if e not in now and e not in rnd.replaced]
        for backend, group in groupby(missing, key=lambda pair: pair[1]):
            records = []
            for edit_id, _ in group:
                try:
                    records.append(rnd.taken_out.get(edit_id) or self.queue.get(edit_id))
                except Exception:
                    log.exception("edit_restore_unreadable", edit_id=edit_id, backend=backend.value)
            if records:
                self._reapply(backend, records, report)

    def _reapply(self, backend: Backend, records: list[EditRecord], report: BatchReport) -> None:
        specs = [spec_of(r, self.engine.kinds) for r in records]
        try:
            outcomes = self.engine.apply(backend, specs)
        except Exception as exc:  # the editor's guarantee: refused edits leave no trace
            log.exception("edit_restore_crashed", backend=backend.value)
            self.engine.retract(backend, [s.edit_id for s in specs])
            why = f"apply raised {type(exc).__name__}: {exc}"
            outcomes = [EditOutcome(s.edit_id, False, why) for s in specs]
        bad = {o.edit_id: str(o.reason) for o in outcomes if not o.accepted}
        displaced = {o.edit_id: list(o.details.get("superseded", [])) for o in outcomes}
        for edit_id, ids in displaced.items():
            if ids and edit_id not in bad:  # the fact is held by a newer edit now
                bad[edit_id] = f"edits {ids} hold its fact now"
        if self.config.worker.verify:
            taken = [s for s in specs if s.edit_id not in bad]
            for edit_id, check in self.engine.verify(taken, expectations_of(records)).items():
                if not check.passed:
                    bad[edit_id] = f"verification failed (greedy output {check.prompt_output!r})"
        if bad:
            self.engine.retract(backend, list(bad))
            back = [r for ids in displaced.values() for r in map(self._record_or_none, ids) if r]
            if back:
                self._reapply(backend, back, report)
        for record in records:
            if record.id not in bad:
                report.restored.append(record.id)
                log.info("edit_restored", edit_id=record.id, backend=backend.value)
                continue
            why = "left the model for a replacement that did not stay, and could not be "
            why += f"applied again on {backend.value}: {bad[record.id]}"
            try:
                self.queue.transition(record.id, EditStatus.QUARANTINED, reason=why)
                self.queue.transition(record.id, EditStatus.FAILED, reason=why)
            except Exception:
                log.exception("edit_restore_unrecorded", edit_id=record.id, reason=why)
            else:
                log.warning("edit_restore_failed", edit_id=record.id, reason=why)

    # --- helpers ----------------------------------------------------------------------------

    def _model_holds(self) -> dict[str, Backend]:
        """Every edit the model holds, by back-end in applied order: id -> back-end."""
        return {e: b for b, ids in self.engine.applied_ids().items() for e in ids}

    def _check_replace(self, edit_id: str, target: str) -> None:
        """Raise :class:`SupersedeNotAllowedError` unless ``edit_id``'s source may
        replace ``target``."""
        origin = origin_of(self.store, edit_id) or Origin(SourceKind.API)
        check_may_replace(self.store, origin, target)

    def _status(self, edit_id: str) -> EditStatus | None:
        try:
            return self.queue.get(edit_id).status
        except EditNotFoundError:
            return None

    def _record_or_none(self, edit_id: str) -> EditRecord | None:
        try:
            return self.queue.get(edit_id)
        except EditdError:
            return None

    def _fail(
        self,
        edit_id: str,
        reason: str,
        report: BatchReport,
        *,
        retry: bool = False,
        kept: str | None = None,
    ) -> None:
        """Fail a leased edit (or, with ``retry``, send it back after the back-off); a
        feed's edit that failed for good records why on its item (see
        :func:`store.feeds.record_edit_failure`)."""
        try:
            record = self.queue.fail(edit_id, self.name, reason, retry=retry)
        except LeaseLostError:
            report.lost.append(edit_id)
            return
        if record.status is EditStatus.QUEUED:
            report.deferred.append(edit_id)
            return
        report.failed[edit_id] = reason
        if record.source_kind == SourceKind.FEED.value:
            feed_store.record_edit_failure(
                self.store, edit_id, f"edit '{edit_id}' failed: {reason}", kept=kept
            )

    def _give_back(self, edit_ids: Sequence[str], reason: str) -> None:
        """Best effort: requeue (after the back-off) edits this worker still holds. What
        the store refuses now goes back when the lease expires."""
        for edit_id in edit_ids:
            try:
                self.queue.fail(edit_id, self.name, reason, retry=True)
            except Exception as exc:
                log.warning("edit_give_back_failed", edit_id=edit_id, error=str(exc))

    def _heartbeat(self, edit_ids: list[str]) -> None:
        """Extend the batch's leases after each back-end step (a slow batch keeps them)."""
        self.last_progress = time.monotonic()
        held = self.queue.heartbeat(self.name, edit_ids, self.config.worker.lease_s)
        if len(held) < len(edit_ids):
            log.warning("leases_lost_mid_batch", lost=sorted(set(edit_ids) - set(held)))


def _result_json(edit_id: str, result: DispatchResult) -> dict[str, Any]:
    """What the edit record keeps of its dispatch: route, editor details, verification."""
    route = result.routes[edit_id]
    out: dict[str, Any] = {
        "route": {"backend": route.backend.value, "reason": route.reason},
        "editor": result.details.get(edit_id, {}),
    }
    if edit_id in result.verifications:
        out["verification"] = result.verifications[edit_id].to_json_dict()
    if edit_id in result.withheld:
        out["withheld"] = result.withheld[edit_id]
    return out
