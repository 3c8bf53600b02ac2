"""The nightly run: import the spool, release held edits, wait for them, validate drift.

One run (:func:`run_nightly`), whoever starts it (the scheduler, ``editd nightly``):

1. open a ``nightly_runs`` row (status ``running``);
2. import every file in the spool (:func:`daemon.feeds.spool.import_spool`). This comes
   before the release so that spool lines asking for ``schedule = nightly`` are applied
   by this run rather than the next one;
3. release every edit held for the nightly schedule (they become claimable now);
4. wait, polling the store, until none of the edits it imported or released is
   ``queued`` or ``applying`` any more, at most ``wait_s`` (default
   ``[scheduler] nightly_wait_s``); a stopping daemon ends the wait early;
5. run the daemon's drift validation (its error, if any, is recorded, not raised);
6. finish the row as ``done`` with the summary (:meth:`NightlySummary.to_json_dict`)
   and log ``nightly_run_finished``.

The row is ``failed`` only when the run itself crashed: the summary then holds what
was done so far and the error, and the exception propagates. Two runs at once
import each spool file once (the spool's transaction and sha256 row see to it);
each waits for what it imported or released itself.

:func:`import_offline` is the run without a daemon (``editd nightly`` when none is
listening): steps 1-3 and 6 only; the drift validation is ``deferred``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from daemon.config import Config, request_limits
from daemon.errors import DriftDisabledError
from daemon.feeds.spool import SpoolImport, import_spool
from store.db import Store
from store.queue import EditQueue
from store.schema import EditStatus, Schedule
from store.spool import (
    NightlyRunStatus,
    edit_status_counts,
    finish_nightly_run,
    start_nightly_run,
)

log = structlog.get_logger()

SUMMARY_VERSION = 1
Clock = Callable[[], float]
Sleep = Callable[[float], None]


class NightlyHost(Protocol):
    """What a nightly run needs from the daemon (:class:`daemon.service.daemon.Daemon` is one)."""

    @property
    def config(self) -> Config: ...

    def live_store(self) -> Store: ...

    def live_queue(self) -> EditQueue: ...

    def run_drift_check(self) -> dict[str, Any]: ...

    @property
    def stopping(self) -> bool: ...


@dataclass(frozen=True)
class NightlySummary:
    """How one nightly run went; :meth:`to_json_dict` is what the run's row stores.

    ``edits`` counts the states of the edits the run waited for (``waited_for``,
    ``applied``, ``failed``, ``pending``: still queued or applying, ``other``:
    rejected, retracted, superseded or quarantined meanwhile). ``wait`` says how the
    wait ended (``outcome``: ``done``, ``timed_out``, ``stopped``, ``nothing`` or
    ``skipped``). ``drift`` has a ``status`` (``passed``, ``failed``, ``rolled_back``,
    ``error``, ``disabled``, ``skipped``, ``deferred``) and the report or the error.
    """

    run_id: int
    trigger: str
    status: NightlyRunStatus
    released: int = 0
    spool: SpoolImport | None = None
    edits: dict[str, int] = field(default_factory=dict)
    wait: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The summary as stored (see the module doc for the meaning of each part)."""
        spool = self.spool or SpoolImport(())
        totals = spool.totals
        return {
            "version": SUMMARY_VERSION,
            "run_id": self.run_id,
            "trigger": self.trigger,
            "status": self.status.value,
            "released": self.released,
            "files": [f.short_json() for f in spool.files],
            "skipped_files": list(spool.skipped),
            "accepted": totals["accepted"],
            "rejected": totals["rejected"],
            "duplicates": totals["duplicates"],
            "spool": totals,
            **{key: self.edits.get(key, 0) for key in _EDIT_KEYS},
            "wait": self.wait,
            "drift": self.drift,
            "durations_s": self.durations_s,
            "error": self.error,
        }


_EDIT_KEYS = ("waited_for", "applied", "failed", "pending", "other")
# After this step, the run's own work: wait and validate (online) or defer (offline).
_After = Callable[[list[str], dict[str, Any]], None]


def run_nightly(
    host: NightlyHost,
    *,
    trigger: str,
    wait_s: float | None = None,
    poll_s: float = 1.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> NightlySummary:
    """One nightly run in a running daemon (see the module doc)."""
    store, config = host.live_store(), host.config
    timeout_s = config.scheduler.nightly_wait_s if wait_s is None else wait_s

    def wait_and_validate(edit_ids: list[str], parts: dict[str, Any]) -> None:
        t0 = clock()
        parts["edits"], outcome = wait_for_edits(
            store, edit_ids, timeout_s=timeout_s, poll_s=poll_s, host=host, clock=clock, sleep=sleep
        )
        parts["wait"] = {"outcome": outcome, "timeout_s": timeout_s}
        parts["durations_s"]["wait"] = round(clock() - t0, 3)
        t0 = clock()
        parts["drift"] = validate_drift(host)
        parts["durations_s"]["drift"] = round(clock() - t0, 3)

    return _run(store, host.live_queue(), config, trigger, wait_and_validate, clock)


def import_offline(store: Store, config: Config, *, trigger: str) -> NightlySummary:
    """The nightly run without a daemon: import and release only (see the module doc)."""

    def defer(edit_ids: list[str], parts: dict[str, Any]) -> None:
        parts["edits"] = _edit_counts(edit_status_counts(store, edit_ids), len(edit_ids))
        parts["wait"] = {"outcome": "skipped", "reason": "no daemon running"}
        parts["drift"] = {"status": "deferred", "reason": "no daemon running"}

    return _run(store, EditQueue(store), config, trigger, defer, time.monotonic)


def wait_for_edits(
    store: Store,
    edit_ids: list[str],
    *,
    timeout_s: float,
    poll_s: float,
    host: NightlyHost,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> tuple[dict[str, int], str]:
    """Poll until no edit of ``edit_ids`` is queued or applying, the time is up, or the
    host stops; the state counts (:class:`NightlySummary` ``edits``) and the outcome."""
    if not edit_ids:
        return _edit_counts({}, 0), "nothing"
    deadline = clock() + timeout_s
    while True:
        counts = _edit_counts(edit_status_counts(store, edit_ids), len(edit_ids))
        if counts["pending"] == 0:
            return counts, "done"
        if host.stopping:
            return counts, "stopped"
        left = deadline - clock()
        if left <= 0:
            return counts, "timed_out"
        sleep(min(poll_s, left))


def validate_drift(host: NightlyHost) -> dict[str, Any]:
    """The daemon's drift check as a summary part; its failure is recorded, not raised."""
    if host.stopping:
        return {"status": "skipped", "reason": "daemon stopping"}
    try:
        report = host.run_drift_check()
    except DriftDisabledError as exc:
        return {"status": "disabled", "reason": str(exc)}
    except Exception as exc:
        log.exception("nightly_drift_failed")
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    if not report:
        return {"status": "skipped", "reason": "no drift report"}
    if report.get("passed"):
        status = "passed"
    else:
        status = "rolled_back" if report.get("rollback") else "failed"
    return {"status": status, "report": report}


def _run(
    store: Store, queue: EditQueue, config: Config, trigger: str, after: _After, clock: Clock
) -> NightlySummary:
    run_id = start_nightly_run(store, trigger)
    log.info("nightly_run_started", run_id=run_id, trigger=trigger)
    t_start = clock()
    parts: dict[str, Any] = {"durations_s": {}}
    try:
        t0 = clock()
        spool = import_spool(
            store,
            config.feeds.spool_dir,
            limits=request_limits(config),
            max_file_bytes=config.feeds.spool_max_file_bytes,
            run_id=run_id,
        )
        parts["spool"], parts["durations_s"]["import"] = spool, round(clock() - t0, 3)
        t0 = clock()
        released = _release(queue)
        parts["released"], parts["durations_s"]["release"] = len(released), round(clock() - t0, 3)
        after(list(dict.fromkeys([*spool.edit_ids(), *released])), parts)
    except BaseException as exc:
        parts["durations_s"]["total"] = round(clock() - t_start, 3)
        failed = NightlySummary(
            run_id, trigger, NightlyRunStatus.FAILED, **parts, error=f"{type(exc).__name__}: {exc}"
        )
        log.exception("nightly_run_failed", run_id=run_id, trigger=trigger, error=failed.error)
        try:
            finish_nightly_run(store, run_id, NightlyRunStatus.FAILED, failed.to_json_dict())
        except Exception:
            log.exception("nightly_run_not_recorded", run_id=run_id)
        raise
    parts["durations_s"]["total"] = round(clock() - t_start, 3)
    summary = NightlySummary(run_id, trigger, NightlyRunStatus.DONE, **parts)
    finish_nightly_run(store, run_id, NightlyRunStatus.DONE, summary.to_json_dict())
    _log_finished(summary)
    return summary


def _release(queue: EditQueue) -> list[str]:
    """Release the nightly edits; their ids (read in the same transaction)."""
    return queue.release_schedule_ids(Schedule.NIGHTLY)


def _edit_counts(by_status: dict[str, int], total: int) -> dict[str, int]:
    pending = by_status.get(EditStatus.QUEUED, 0) + by_status.get(EditStatus.APPLYING, 0)
    applied = by_status.get(EditStatus.APPLIED, 0)
    failed = by_status.get(EditStatus.FAILED, 0)
    other = sum(by_status.values()) - pending - applied - failed
    return {
        "waited_for": total,
        "applied": applied,
        "failed": failed,
        "pending": pending,
        "other": other,
    }


def _log_finished(summary: NightlySummary) -> None:
    data = summary.to_json_dict()
    log.info(
        "nightly_run_finished",
        run_id=summary.run_id,
        trigger=summary.trigger,
        released=summary.released,
        files=len(data["files"]),
        **{key: data[key] for key in ("accepted", "rejected", "duplicates", *_EDIT_KEYS)},
        wait=summary.wait.get("outcome"),
        drift=summary.drift.get("status"),
        seconds=summary.durations_s.get("total"),
    )
