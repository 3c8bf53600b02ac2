"""Periodic jobs (apscheduler 3.x, a background thread): leases, nightly, checkpoints, drift.

- ``requeue_expired`` every ``[scheduler] requeue_interval_s``: leases of dead
  workers go back to the queue;
- ``nightly`` at ``[scheduler] nightly_time`` (``timezone``) unless
  ``nightly_enabled = false``: the nightly run (:mod:`daemon.service.nightly`): edits
  submitted with ``schedule = nightly`` become claimable, the spool is imported,
  drift is validated once they are applied;
- ``feeds`` every ``[feeds] tick_s`` (and at start): polls the feeds that are due;
- ``checkpoint`` every ``[checkpoints] every_minutes`` when edits were applied
  since the last one;
- ``drift`` every ``[drift] interval_minutes`` when drift validation is on.

Jobs never overlap themselves (``max_instances = 1``) and a missed run is
coalesced into one. Each job logs and swallows its own errors: a failing job
must not stop the others.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from daemon.config import Config
from daemon.service.drift_job import DriftMonitor
from daemon.service.ingest import Ingestion
from store.checkpoints import CheckpointRecord
from store.queue import EditQueue
from store.schema import Schedule

log = structlog.get_logger()


class SchedulerHost(Protocol):
    """What the scheduled jobs need from the daemon (:class:`daemon.service.daemon.Daemon`
    is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def edits_since_checkpoint(self) -> int: ...

    @property
    def ingestion(self) -> Ingestion: ...

    @property
    def drift(self) -> DriftMonitor | None: ...

    def live_queue(self) -> EditQueue: ...

    def checkpoint(self, reason: str) -> CheckpointRecord | None: ...

    def run_drift_check(self) -> dict[str, Any]: ...


def _guarded(name: str, job: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            result = job()
            log.debug("job_ran", job=name, result=result)
        except Exception:
            log.exception("job_failed", job=name)

    return run


def nightly_release(daemon: SchedulerHost) -> int:
    """Release the nightly edits into the queue now; how many."""
    return daemon.live_queue().release_schedule(Schedule.NIGHTLY)


def interval_checkpoint(daemon: SchedulerHost) -> str | None:
    """A checkpoint if edits were applied since the last one."""
    if daemon.stopping or daemon.edits_since_checkpoint == 0:
        return None
    record = daemon.checkpoint("interval")
    return None if record is None else record.id


def start_scheduler(daemon: SchedulerHost) -> BackgroundScheduler | None:
    """Start the jobs for ``daemon`` (None when ``[scheduler] enabled = false``)."""
    cfg = daemon.config
    if not cfg.scheduler.enabled:
        log.info("scheduler_disabled")
        return None
    scheduler = BackgroundScheduler(
        timezone=cfg.scheduler.timezone,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
    )
    queue = daemon.live_queue()
    scheduler.add_job(
        _guarded("requeue_expired", queue.requeue_expired),
        "interval",
        seconds=cfg.scheduler.requeue_interval_s,
        id="requeue_expired",
    )
    if cfg.scheduler.nightly_enabled:
        hour, minute = (int(p) for p in cfg.scheduler.nightly_time.split(":"))
        scheduler.add_job(
            _guarded("nightly", lambda: daemon.ingestion.nightly("schedule")),
            CronTrigger(hour=hour, minute=minute, timezone=cfg.scheduler.timezone),
            id="nightly",
        )
    if cfg.feeds.enabled:
        scheduler.add_job(
            _guarded("feeds", daemon.ingestion.poll_due),
            "interval",
            seconds=cfg.feeds.tick_s,
            id="feeds",
            next_run_time=datetime.now(UTC),
        )
    scheduler.add_job(
        _guarded("checkpoint", lambda: interval_checkpoint(daemon)),
        "interval",
        minutes=cfg.checkpoints.every_minutes,
        id="checkpoint",
    )
    if daemon.drift is not None:
        scheduler.add_job(
            _guarded("drift", daemon.run_drift_check),
            "interval",
            minutes=cfg.drift.interval_minutes,
            id="drift",
        )
    scheduler.start()
    log.info("scheduler_started", jobs=[j.id for j in scheduler.get_jobs()])
    return scheduler
