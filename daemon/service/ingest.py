"""The daemon's ingestion jobs: the feed poller and the nightly run.

Both only write to the store (edit requests, feed and spool state); the worker
applies what they queue. Feed items that retract an edit go through the daemon's
:meth:`~daemon.service.daemon.Daemon.retract`, so the live model forgets at once.

- Feeds are polled by one scheduler job every ``[feeds] tick_s``: it polls each
  feed whose own interval has passed (feeds are added and removed at run time with
  ``editd feeds add|remove``, so the job reads the store each time). ``POST
  /v1/feeds/poll`` polls now. Polls never overlap (one lock).
- The nightly run (:func:`daemon.service.nightly.run_nightly`) runs from the scheduler at
  ``[scheduler] nightly_time`` or in the background on ``POST /v1/nightly`` (what
  ``editd nightly`` and ``editd-nightly.timer`` call); at most one runs at a time.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import structlog

from daemon.feeds.poller import FeedPoller, PollReport
from daemon.service.metrics import DaemonMetrics
from daemon.service.nightly import NightlyHost, run_nightly
from store.edits import EditRecord
from store.spool import fail_interrupted_runs, latest_nightly_run

log = structlog.get_logger()


class IngestionHost(NightlyHost, Protocol):
    """What feed polls and nightly runs need from the daemon
    (:class:`daemon.service.daemon.Daemon` is one): a nightly run's needs, and retraction
    for feed items that are withdrawn, and the metrics each poll is counted in."""

    @property
    def metrics(self) -> DaemonMetrics: ...

    def retract(self, edit_id: str, reason: str) -> EditRecord: ...


class Ingestion:
    """Feed polls and nightly runs for one daemon."""

    def __init__(self, daemon: IngestionHost) -> None:
        self.daemon = daemon
        self._poll_lock = threading.Lock()
        self._nightly_lock = threading.Lock()
        self._nightly_thread: threading.Thread | None = None

    def recover(self) -> int:
        """At start-up: close this daemon's nightly runs that a crash left ``running``."""
        return fail_interrupted_runs(
            self.daemon.live_store(),
            ("schedule", "api"),
            "interrupted: the daemon stopped during the run (its edits stay queued)",
        )

    def poller(self) -> FeedPoller:
        """A poller over the live store with the current config (it may have been reloaded)."""
        return FeedPoller(self.daemon.live_store(), self.daemon.config, retract=self.daemon.retract)

    def poll_due(self) -> list[PollReport]:
        """Poll every due feed (the scheduler's job)."""
        if not self.daemon.config.feeds.enabled:
            return []
        with self._poll_lock:
            return self._counted(self.poller().poll_due(should_stop=lambda: self.daemon.stopping))

    def poll(self, name: str | None) -> list[PollReport]:
        """Poll ``name`` now (due or not), or every due feed."""
        with self._poll_lock:
            poller = self.poller()
            if name is None:
                return self._counted(poller.poll_due(should_stop=lambda: self.daemon.stopping))
            return self._counted([poller.poll(name)])

    def _counted(self, reports: list[PollReport]) -> list[PollReport]:
        for report in reports:
            self.daemon.metrics.feed_polled(report.feed, report.outcome, malformed=report.malformed)
        return reports

    def nightly(self, trigger: str) -> dict[str, Any] | None:
        """Run the nightly run here and now; None if one is already running."""
        if not self._nightly_lock.acquire(blocking=False):
            log.info("nightly_already_running", trigger=trigger)
            return None
        try:
            return run_nightly(self.daemon, trigger=trigger).to_json_dict()
        finally:
            self._nightly_lock.release()

    def start_nightly(self, trigger: str) -> dict[str, Any]:
        """Start the nightly run in a background thread (unless one runs)."""
        running = self._nightly_lock.locked()
        if not running:
            self._nightly_thread = threading.Thread(
                target=self._nightly_guarded, args=(trigger,), name="editd-nightly", daemon=True
            )
            self._nightly_thread.start()
        latest = latest_nightly_run(self.daemon.live_store())
        return {
            "started": not running,
            "latest_run": None if latest is None else latest.to_json_dict(),
        }

    def _nightly_guarded(self, trigger: str) -> None:
        try:
            self.nightly(trigger)
        except Exception:
            log.exception("nightly_run_crashed", trigger=trigger)
