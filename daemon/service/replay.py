"""Bring the live model in line with the store: the store is the source of truth.

At start-up (and after a rollback or a manual restore) the editors' state is
a cache of "base model + applied edits":

1. edits left ``applying`` by a dead process go back to the queue;
2. the newest checkpoint that verifies is loaded (corrupt ones are skipped);
3. :func:`reconcile` retracts what the model holds but the store no longer
   calls ``applied`` (retracted, superseded, quarantined since the checkpoint)
   and re-applies, batch by batch in applied order on the recorded back-end,
   the ``applied`` edits the model lacks.

Replaying the same batches in the same order gives the same state, with one
exception: a hook batch whose refused edits were escalated to MELO is replayed
without them, and because the hook optimises a batch's targets jointly the
remaining edits' values differ slightly (in the 1,000-edit restore benchmark
one edit of 1,000 no longer verified on full replay). Checkpoints make this
rare: only edits after the newest checkpoint are replayed.

An edit that cannot be re-applied (refused, or not verified) is moved to
``failed`` through ``quarantined``, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

import structlog

from daemon.editors.registry import BACKENDS
from daemon.engine.engine import Engine
from daemon.service.worker import expectations_of, spec_of
from store.db import Store
from store.edits import EditRecord
from store.queue import EditQueue
from store.schema import Backend, EditStatus

log = structlog.get_logger()


@dataclass(frozen=True)
class ReconcileReport:
    """What :func:`reconcile` changed."""

    replayed: int = 0
    retracted: int = 0
    failed: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class RestoreReport:
    """What start-up restore did."""

    checkpoint_id: str | None
    from_checkpoint: int
    requeued: int
    reconcile: ReconcileReport = field(default_factory=ReconcileReport)
    seconds: float = 0.0


def applied_in_order(store: Store) -> list[EditRecord]:
    """Every ``applied`` edit, in the order it was applied."""
    return EditQueue(store).in_status(EditStatus.APPLIED)


def requeue_orphans(queue: EditQueue, store: Store) -> int:
    """Edits left ``applying`` by a process that is gone go back to the queue.

    Only one daemon owns a store (and the model), so at start-up every lease is
    a dead process's, expired or not.
    """
    ids = [r.id for r in queue.in_status(EditStatus.APPLYING)]
    for edit_id in ids:
        queue.transition(edit_id, EditStatus.QUEUED, reason="taken back at start-up")
    if ids:
        log.warning("orphaned_edits_requeued", edit_ids=ids)
    return len(ids)


def reconcile(engine: Engine, queue: EditQueue, store: Store, *, verify: bool) -> ReconcileReport:
    """Make the model hold exactly the store's ``applied`` edits (see the module doc)."""
    t0 = time.perf_counter()
    desired = [r for r in applied_in_order(store) if r.backend in BACKENDS]
    wanted = {(r.id, Backend(r.backend)) for r in desired}
    retracted = 0
    for backend, held in engine.applied_ids().items():
        stale = [e for e in held if (e, backend) not in wanted]
        if stale:
            engine.retract(backend, stale)
            retracted += len(stale)
    held_now = {(e, b) for b, ids in engine.applied_ids().items() for e in ids}
    missing = [r for r in desired if (r.id, Backend(r.backend)) not in held_now]
    failed: list[str] = []
    for (_batch, backend_name), group in groupby(missing, key=lambda r: (r.batch_id, r.backend)):
        failed += _replay_batch(engine, queue, Backend(backend_name), list(group), verify)
    report = ReconcileReport(
        replayed=len(missing) - len(failed),
        retracted=retracted,
        failed=tuple(failed),
        seconds=round(time.perf_counter() - t0, 3),
    )
    log.info(
        "reconciled",
        replayed=report.replayed,
        retracted=retracted,
        failed=list(failed),
        seconds=report.seconds,
    )
    return report


def _replay_batch(
    engine: Engine, queue: EditQueue, backend: Backend, records: Sequence[EditRecord], verify: bool
) -> list[str]:
    specs = [spec_of(r, engine.kinds) for r in records]
    outcomes = engine.apply(backend, specs)
    bad = {o.edit_id: str(o.reason) for o in outcomes if not o.accepted}
    if verify:
        taken = [s for s in specs if s.edit_id not in bad]
        for edit_id, check in engine.verify(taken, expectations_of(records)).items():
            if not check.passed:
                bad[edit_id] = f"verification failed on replay (output {check.prompt_output!r})"
        if bad:
            engine.retract(backend, [e for e in bad if e in set(engine.applied_ids()[backend])])
    for edit_id, reason in bad.items():
        why = f"could not be re-applied on {backend.value}: {reason}"
        queue.transition(edit_id, EditStatus.QUARANTINED, reason=why)
        queue.transition(edit_id, EditStatus.FAILED, reason=why)
        log.warning("replay_failed", edit_id=edit_id, reason=why)
    return list(bad)
