"""The daemon: owns the store, the model (through the engine), the worker and the jobs.

:class:`Daemon` is what ``editd serve`` runs and what the HTTP API talks to
(it implements :class:`daemon.api.facade.DaemonFacade`). Start-up order:

0. take the store's lock (:mod:`daemon.service.instance_lock`): one daemon per store, or
   ``StoreInUseError`` before anything below touches the store or the checkpoints;
1. open the store; recover the checkpoint folder (temp and orphan folders);
2. load the model and build the editors (``[router] backends``, by the registry);
3. score the drift probes on the base model (cached per model and probe set);
4. restore: requeue orphaned ``applying`` edits, load the newest checkpoint
   that verifies, reconcile the model with the store's ``applied`` edits;
5. start the worker thread and the scheduler. ``is_ready`` is true from here.

Shutdown (:meth:`Daemon.stop`): the worker finishes its batch, a checkpoint is
written, the scheduler stops, the store closes, the lock goes. A start that fails
stops the same way (without the checkpoint), so its lock goes too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing
from dataclasses import replace
from typing import Any, TypeVar

import structlog

from daemon import __version__
from daemon.config import Config, chat_template_text, request_limits
from daemon.editors.base import Editor
from daemon.engine.backend_health import BackendHealth
from daemon.engine.completions import (
    CompletionChoice,
    CompletionDelta,
    CompletionRequest,
    collect,
)
from daemon.engine.dispatch import Step
from daemon.engine.engine import Engine, build_editor
from daemon.errors import (
    CheckpointError,
    DaemonNotReadyError,
    DriftDisabledError,
    EditdError,
    InvalidTransitionError,
)
from daemon.model.chat import render_chat
from daemon.model.loading import LoadedModel
from daemon.model.source import load_configured_model
from daemon.service.checkpoints import CheckpointManager, Persistable, persistable
from daemon.service.drift_job import DriftMonitor
from daemon.service.ingest import Ingestion
from daemon.service.instance_lock import StoreLock
from daemon.service.metrics import DaemonMetrics
from daemon.service.replay import RestoreReport, reconcile, requeue_orphans
from daemon.service.scheduler import start_scheduler
from daemon.service.worker import BatchReport, Worker, WorkerHooks
from store import editlog
from store.checkpoints import CheckpointRecord, get_checkpoint, latest_good
from store.db import Store
from store.edits import EditRecord
from store.feeds import feed_states
from store.intake import EnqueueResult
from store.probes import latest_probe_run
from store.queue import EditQueue, QueuePolicy
from store.schema import Backend, EditKind, EditStatus
from store.spool import latest_nightly_run

log = structlog.get_logger()

T = TypeVar("T")

Progress = Callable[[str], None]


def _no_progress(_: str) -> None:
    return None


class Daemon:
    """One editd process's state and behaviour (see the module doc)."""

    def __init__(self, config: Config, *, metrics: DaemonMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or DaemonMetrics(__version__, backends=config.router.backends)
        self.store_lock: StoreLock | None = None
        self.health = BackendHealth(config.health, config.router.backends)
        self.store: Store | None = None
        self.queue: EditQueue | None = None
        self.engine: Engine | None = None
        self.worker: Worker | None = None
        self.checkpoints: CheckpointManager | None = None
        self.drift: DriftMonitor | None = None
        self.scheduler: Any = None
        self.restore_report: RestoreReport | None = None
        self._stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._edits_since_checkpoint = 0
        self._batches_since_drift = 0
        self._last_checkpoint_at = time.time()
        self.batches_done = 0  # batches whose follow-up (drift check, checkpoint) finished
        self.chat_template: str | None = None  # [api] chat_template's text
        self.loaded_at: float | None = None  # when the model finished loading (Unix time)
        self._stopped = False
        self.ingestion = Ingestion(self)

    # --- life cycle ---------------------------------------------------------------------

    def claim_store(self) -> None:
        """Take the store's lock unless this daemon holds it; ``StoreInUseError`` when
        another process does (``editd serve`` claims it before binding its port)."""
        if self.store_lock is None:
            self.store_lock = StoreLock.acquire(self.config.store.path, role="daemon")

    def start(self, progress: Progress = _no_progress) -> None:
        """Load everything and start the worker and jobs (see the module doc)."""
        self.claim_store()
        try:
            self._start(progress)
        except BaseException:
            self.stop(checkpoint=False)
            raise

    def _start(self, progress: Progress) -> None:
        cfg = self.config
        progress("opening the store")
        self.store = Store.open(cfg.store.path, quick_check=True)
        self.queue = EditQueue(self.store, _policy(cfg))
        self.checkpoints = CheckpointManager(cfg.checkpoints.dir, self.store, cfg.checkpoints.keep)
        self.checkpoints.recover()
        self.ingestion.recover()
        self.chat_template = chat_template_text(cfg.api)
        progress("loading the model")
        loaded = load_configured_model(cfg.model, progress=False)
        self.loaded_at = time.time()
        self.metrics.model_loaded(loaded.load_seconds)
        if cfg.drift.enabled:
            self.drift = DriftMonitor.build(cfg, loaded, self.store)
        progress("building the editors")
        self.engine = Engine(loaded, self._build_editors(loaded), self.config.kinds)
        if self.drift is not None:
            progress("scoring drift probes on the base model")
            self.drift.prepare(self.engine)
        progress("restoring edits")
        self.restore_report = self.restore()
        self._resume_checkpoint_cadence(self.restore_report)
        self.worker = Worker(self.store, self.queue, self.engine, cfg, hooks=self._worker_hooks())
        self._worker_thread = threading.Thread(
            target=self.worker.run, args=(self._stop,), name="editd-worker", daemon=True
        )
        self._worker_thread.start()

        self.scheduler = start_scheduler(self)
        self._ready.set()
        log.info("daemon_ready", backends=[b.value for b in self.engine.backends])

    def _build_editors(self, loaded: LoadedModel) -> dict[Backend, Editor]:
        wanted = [Backend(b) for b in self.config.router.backends]
        probes = self.drift.prompts() if self.drift is not None else ()
        editors: dict[Backend, Editor] = {}
        for backend in wanted:
            editors[backend] = build_editor(
                backend.value, loaded, self.config, calibration_prompts=probes
            )
        return editors

    def stop(self, *, checkpoint: bool = True) -> None:
        """Finish the current batch, checkpoint, stop the jobs, close the store (once:
        later calls return at once)."""
        if self._stopped:
            return
        self._stopped = True
        self._ready.clear()
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self._worker_thread is not None:
            self._worker_thread.join()
        if checkpoint and self.engine is not None:
            try:
                self.checkpoint("shutdown")
            except EditdError:
                log.exception("shutdown_checkpoint_failed")
        if self.store is not None:
            self.store.close()
        if self.store_lock is not None:
            self.store_lock.release()
            self.store_lock = None
        log.info("daemon_stopped")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def edits_since_checkpoint(self) -> int:
        """Edits applied since the last checkpoint (the interval job skips when none)."""
        return self._edits_since_checkpoint

    def worker_progress_age(self) -> float:
        """Seconds since the worker last made progress (for the watchdog)."""
        if self.worker is None:
            return 0.0
        return time.monotonic() - self.worker.last_progress

    def worker_problem(self) -> str | None:
        """Why the worker is not healthy (its thread died, or it has made no progress
        for longer than a lease), or ``None`` (also before start and while stopping)."""
        thread, limit = self._worker_thread, self.config.worker.lease_s
        if thread is None or self.stopping:
            return None
        if not thread.is_alive():
            return "the worker thread has stopped"
        age = self.worker_progress_age()
        if age > limit:
            return f"the worker has made no progress for {age:.0f} s (lease_s is {limit:g})"
        return None

    def reload(self, config: Config) -> None:
        """Take the reloadable parts of ``config`` (SIGHUP): worker, router policy,
        checkpoints cadence, drift thresholds, feed polling and extractor rules, the
        nightly wait, log level, the back-end health thresholds. Model, store, editors,
        API binding, the spool folder and the job times need a restart."""
        self.config = replace(
            self.config,
            worker=config.worker,
            router=replace(config.router, backends=self.config.router.backends),
            checkpoints=replace(config.checkpoints, dir=self.config.checkpoints.dir),
            drift=config.drift,
            feeds=replace(config.feeds, spool_dir=self.config.feeds.spool_dir),
            scheduler=replace(
                self.config.scheduler, nightly_wait_s=config.scheduler.nightly_wait_s
            ),
            log=config.log,
            health=config.health,
        )
        self.health.reconfigure(config.health)
        if self.worker is not None:
            self.worker.config = self.config
        if self.drift is not None:
            self.drift.config = self.config.drift
        log.info("config_reloaded", source=str(config.source))

    # --- restore, checkpoints ------------------------------------------------------------

    def persistables(self) -> dict[str, Persistable]:
        engine = self.live_engine()
        return {b.value: persistable(e) for b, e in engine.editors.items()}

    def restore(self, checkpoint_id: str | None = None) -> RestoreReport:
        """Load a checkpoint (the newest valid one by default) and replay the store."""
        store, queue, engine, manager = (
            self.live_store(),
            self.live_queue(),
            self.live_engine(),
            self.live_checkpoints(),
        )
        t0 = time.perf_counter()
        with engine.lock:
            requeued = requeue_orphans(queue, store)
            if checkpoint_id is not None:
                record = get_checkpoint(store, checkpoint_id)
                found: tuple[CheckpointRecord, Any] | None = (record, manager.verify(record))
            else:
                found = manager.latest_valid()
            count = 0
            engine.reset()
            if found is not None:
                try:
                    count = manager.restore(found[0], self.persistables()).edit_count
                    self.metrics.checkpoint_written(found[0].created_at)
                except CheckpointError as exc:
                    if checkpoint_id is not None:
                        raise
                    # e.g. written with other back-ends enabled: replay everything instead
                    log.warning(
                        "checkpoint_not_restorable", checkpoint_id=found[0].id, error=str(exc)
                    )
                    engine.reset()
                    found = None
            result = reconcile(engine, queue, store, verify=self.config.worker.verify)
        report = RestoreReport(
            checkpoint_id=None if found is None else found[0].id,
            from_checkpoint=count,
            requeued=requeued,
            reconcile=result,
            seconds=round(time.perf_counter() - t0, 3),
        )
        log.info(
            "restored",
            checkpoint_id=report.checkpoint_id,
            from_checkpoint=count,
            replayed=result.replayed,
            retracted=result.retracted,
            requeued=requeued,
            seconds=report.seconds,
        )
        return report

    def checkpoint(self, reason: str) -> CheckpointRecord | None:
        """Write a checkpoint between batches. With drift validation on, the probes run
        first and a failing model is rolled back instead (a checkpoint is always good)."""
        engine, store = self.live_engine(), self.live_store()
        with engine.lock:
            if self.drift is not None and reason != "shutdown":
                report = self.drift.check(engine, self.live_queue(), store, self.metrics)
                if not report.passed:
                    self.drift.rollback(self, report)
                    return None
            record = self.live_checkpoints().create(
                self.persistables(),
                watermark=editlog.last_event_id(store),
                reason=reason,
                extra={"model": engine.loaded.name_or_path},
            )
            self._edits_since_checkpoint = 0
            self._last_checkpoint_at = time.time()
            self.metrics.checkpoint_written(record.created_at)
            return record

    def _resume_checkpoint_cadence(self, report: RestoreReport) -> None:
        """Count replayed edits toward the checkpoint cadence, and time it from the last
        checkpoint: a daemon that keeps crashing before ``every_edits`` new edits would
        otherwise never checkpoint, and every restart would replay more. A replay that
        already reaches the cadence is checkpointed now, before the worker starts."""
        self._edits_since_checkpoint = report.reconcile.replayed
        last = latest_good(self.live_store())
        self._last_checkpoint_at = last.created_at if last is not None else time.time()
        if self.due_checkpoint():
            self.checkpoint("restore")

    def due_checkpoint(self) -> bool:
        cfg = self.config.checkpoints
        return (
            self._edits_since_checkpoint >= cfg.every_edits
            or time.time() - self._last_checkpoint_at >= cfg.every_minutes * 60
        ) and self._edits_since_checkpoint > 0

    # --- worker hooks ------------------------------------------------------------------

    def _worker_hooks(self) -> WorkerHooks:
        def on_applied(record: EditRecord) -> None:
            if record.applied_at is not None:
                self.metrics.observe_submit_to_applied(record.applied_at - record.created_at)

        return WorkerHooks(
            on_applied=on_applied,
            on_verification_failure=lambda b: self.metrics.verification_failed(b.value),
            on_batch=lambda b, outcome: self.metrics.batch_finished(b.value, outcome),
            on_step=self._after_step,
            after_batch=self._after_batch,
        )

    def _after_step(self, step: Step) -> None:
        rates = self.health.record(step)
        self.metrics.backend_step(
            rates.backend,
            edits=len(step.edit_ids),
            escalated=len(step.escalated),
            failure_rate=rates.verification_failure_rate,
            escalation_rate=rates.escalation_rate,
            degraded=rates.degraded,
        )

    def _after_batch(self, report: BatchReport) -> None:
        self._edits_since_checkpoint += len(report.applied)
        self._batches_since_drift += 1
        try:
            if (
                self.drift is not None
                and self._batches_since_drift >= self.config.drift.every_batches
            ):
                self.run_drift_check()
            if self.due_checkpoint():
                self.checkpoint("cadence")
        except EditdError:
            log.exception("after_batch_job_failed")
        finally:
            self.batches_done += 1

    def run_drift_check(self) -> dict[str, Any]:
        """Score the probes now; roll back and isolate on failure. The run as JSON."""
        if self.drift is None:
            raise DriftDisabledError("drift validation is disabled ([drift] enabled = false)")
        engine = self.live_engine()
        with engine.lock:
            self._batches_since_drift = 0
            report = self.drift.check(engine, self.live_queue(), self.live_store(), self.metrics)
            out = report.to_json_dict()
            if not report.passed:
                out["rollback"] = self.drift.rollback(self, report)
            return out

    # --- the facade ----------------------------------------------------------------------

    def submit(self, raws: Sequence[object]) -> list[EnqueueResult]:
        return self.live_queue().submit_many(raws, limits=request_limits(self.config))

    def get_edit(self, edit_id: str) -> EditRecord:
        return self.live_queue().get(edit_id)

    def list_edits(
        self,
        status: EditStatus | None,
        limit: int,
        after: str | None,
        kind: EditKind | None = None,
    ) -> list[EditRecord]:
        return self.live_queue().list(status=status, limit=limit, after=after, kind=kind)

    def retract(self, edit_id: str, reason: str) -> EditRecord:
        queue, engine = self.live_queue(), self.live_engine()
        with engine.lock:  # between batches: the edit is not half-way through a batch
            record = queue.get(edit_id)
            if record.status is EditStatus.APPLIED and record.backend:
                engine.retract(Backend(record.backend), [edit_id])
            elif record.status is EditStatus.APPLYING:
                raise InvalidTransitionError(edit_id, record.status.value, "retracted")
            updated = queue.transition(edit_id, EditStatus.RETRACTED, reason=reason)
        log.info("edit_retracted", edit_id=edit_id, reason=reason)
        return updated

    def complete(self, request: CompletionRequest) -> list[CompletionChoice]:
        return collect(request, self.stream(request))

    def stream(self, request: CompletionRequest) -> Generator[CompletionDelta, None, None]:
        """The engine's deltas, measured (``editd_completion_*``); iterate in one thread."""
        return self._measured(self.live_engine().stream(request))

    def _measured(
        self, deltas: Generator[CompletionDelta, None, None]
    ) -> Generator[CompletionDelta, None, None]:
        started = time.perf_counter()
        first_token: float | None = None
        prompt_tokens = completion_tokens = choices = 0
        cancelled = False
        try:
            with closing(deltas):  # closing this generator ends the engine's at once
                for delta in deltas:
                    generated = (delta.usage or {}).get("completion_tokens", 0)
                    if first_token is None and (delta.finish_reason is None or generated):
                        first_token = time.perf_counter() - started
                    if delta.usage is not None:
                        prompt_tokens += delta.usage.get("prompt_tokens", 0)
                        completion_tokens += generated
                        choices += 1
                    yield delta
        except GeneratorExit:  # the consumer stopped early (a client went away)
            cancelled = True
            raise
        finally:
            self.metrics.completions_served(choices)
            self.metrics.completion_finished(
                seconds=time.perf_counter() - started,
                first_token_seconds=first_token,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cancelled=cancelled,
            )

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """``messages`` as the model's prompt (``[api] chat_template`` or the model's own
        template); raises ``ChatTemplateError``."""
        return render_chat(self.live_engine().loaded.tokenizer, messages, self.chat_template)

    def model_name(self) -> str:
        return self.config.model.name_or_path

    def model_info(self) -> dict[str, Any]:
        """The served model and how far the edits have come: ``name_or_path``,
        ``loaded_at``, ``applied_edits``, ``applied_by_backend`` and ``watermark`` (the
        edit log's newest event id, as checkpoints record it)."""
        engine, queue, store = self.live_engine(), self.live_queue(), self.live_store()
        by_backend = queue.applied_by_backend()
        return {
            "name_or_path": engine.loaded.name_or_path,
            "loaded_at": self.loaded_at,
            "applied_edits": sum(by_backend.values()),
            "applied_by_backend": by_backend,
            "watermark": editlog.last_event_id(store),
        }

    def status(self) -> dict[str, Any]:
        store, queue, engine = self.live_store(), self.live_queue(), self.live_engine()
        counts = queue.counts()
        last_ck = latest_good(store)
        drift = latest_probe_run(store, "drift")
        nightly = latest_nightly_run(store)
        return {
            "version": __version__,
            "ready": self.is_ready(),
            "model": engine.loaded.name_or_path,
            "backends": [b.value for b in engine.backends],
            "queue_depth": counts["queued"] + counts["applying"],
            "edits": counts,
            "applied_by_backend": queue.applied_by_backend(),
            "backend_health": {b: r.to_json_dict() for b, r in self.health.snapshot().items()},
            "last_checkpoint": None if last_ck is None else last_ck.to_json_dict(),
            "last_drift": None if drift is None else drift.to_json_dict(),
            "restore": None if self.restore_report is None else _restore_json(self.restore_report),
            "last_nightly": None if nightly is None else nightly.to_json_dict(),
        }

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def metrics_text(self) -> tuple[bytes, str]:
        if self.store is not None and self._ready.is_set():
            self.metrics.set_edit_counts(self.live_queue().counts_by_backend())
            self.metrics.set_queue_depth(self.live_queue().depth())
        return self.metrics.exposition()

    def restore_checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        """Load ``checkpoint_id`` and replay the store's later edits; the report."""
        return _restore_json(self.restore(checkpoint_id))

    def create_checkpoint(self) -> dict[str, Any]:
        record = self.checkpoint("manual")
        if record is None:
            raise EditdError("drift validation failed: the model was rolled back, no checkpoint")
        return record.to_json_dict()

    def list_feeds(self) -> list[dict[str, Any]]:
        return feed_states(self.live_store())

    def poll_feeds(self, name: str | None) -> list[dict[str, Any]]:
        return [report.to_json_dict() for report in self.ingestion.poll(name)]

    def start_nightly(self, trigger: str) -> dict[str, Any]:
        return self.ingestion.start_nightly(trigger)

    # --- live parts (raise DaemonNotReadyError before start) --------------------------------

    def live_store(self) -> Store:
        return _live(self.store)

    def live_queue(self) -> EditQueue:
        return _live(self.queue)

    def live_engine(self) -> Engine:
        return _live(self.engine)

    def live_checkpoints(self) -> CheckpointManager:
        return _live(self.checkpoints)


def _live(part: T | None) -> T:
    """``part`` once the daemon has started it; DaemonNotReadyError before (or after stop)."""
    if part is None:
        raise DaemonNotReadyError("the daemon is not ready yet (starting or stopping)")
    return part


def _policy(cfg: Config) -> QueuePolicy:
    w = cfg.worker
    return QueuePolicy(w.max_attempts, w.backoff_base_s, w.backoff_max_s)


def _restore_json(report: RestoreReport) -> dict[str, Any]:
    return {
        "checkpoint_id": report.checkpoint_id,
        "from_checkpoint": report.from_checkpoint,
        "requeued": report.requeued,
        "replayed": report.reconcile.replayed,
        "retracted": report.reconcile.retracted,
        "failed": list(report.reconcile.failed),
        "seconds": report.seconds,
    }
