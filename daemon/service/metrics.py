"""Prometheus metrics of one daemon process, in a private registry.

``DaemonMetrics`` owns its own ``CollectorRegistry`` (never the global one), so
tests and several daemons in one process do not collide, and ``/metrics``
serves ``exposition()``. The service calls the small verbs below; nothing here
reads the store or the model.

Metrics (counters are exposed with the ``_total`` suffix):

- ``editd_edits{state, backend}`` gauge, set from store counts
- ``editd_queue_depth`` gauge
- ``editd_submit_to_applied_seconds`` histogram (0.1 s .. 1 h)
- ``editd_verification_failures_total{backend}``, ``editd_batches_total{backend, outcome}``
- ``editd_backend_edits_total{backend}`` (edits a back-end was given, escalations included),
  ``editd_escalations_total{backend}`` (edits it passed on to another back-end)
- ``editd_backend_verification_failure_rate{backend}``, ``editd_backend_escalation_rate{backend}``
  and ``editd_backend_degraded{backend}`` (0/1) gauges over the ``[health]`` window
- ``editd_drift_top1_agreement``, ``editd_drift_mean_kl``, ``editd_drift_retention`` gauges
  and ``editd_drift_runs_total{outcome="passed"|"failed"}``
- ``editd_checkpoint_age_seconds`` gauge, computed at scrape time (absent before the first)
- ``editd_model_load_seconds`` gauge, ``editd_rollbacks_total``, ``editd_completions_total``
  (choices served)
- completion requests (``/v1/completions`` and ``/v1/chat/completions``, streamed or not):
  ``editd_completion_seconds`` (request latency), ``editd_completion_first_token_seconds``
  (time to the first generated token), ``editd_completion_tokens_per_second`` (a request's
  generated tokens over its seconds) histograms; ``editd_completion_tokens_total`` and
  ``editd_completion_prompt_tokens_total``; ``editd_completions_cancelled_total`` (streams
  whose client went away)
- ``editd_feed_polls_total{feed, outcome}`` (``ok``, ``not_modified``, ``gone``, ``error``)
  and ``editd_feed_items_malformed_total{feed}``
- ``editd_build_info{version}``
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.editors.registry import backend_names

SUBMIT_TO_APPLIED_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)
COMPLETION_SECONDS_BUCKETS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
TOKENS_PER_SECOND_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DRIFT_OUTCOMES = ("passed", "failed")


class _CheckpointAgeCollector(Collector):
    """``editd_checkpoint_age_seconds``: now minus the last checkpoint's time, at scrape."""

    name = "editd_checkpoint_age_seconds"
    documentation = "Seconds since the last good checkpoint was written."

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def set_last(self, timestamp: float | None) -> None:
        with self._lock:
            self._last = timestamp

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        with self._lock:
            last = self._last
        if last is not None:
            family.add_metric([], max(0.0, self._clock() - last))
        return [family]


class DaemonMetrics:
    """The daemon's metrics; every method is cheap and thread-safe (prometheus_client locks).

    ``backends`` (default: every registered one) pre-creates the per-backend series at
    zero so rates work from the first scrape; ``clock`` (wall-clock seconds) is for the
    checkpoint age.
    """

    def __init__(
        self,
        version: str,
        *,
        backends: Sequence[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._edits = Gauge(
            "editd_edits",
            "Edits in the store by state and backend.",
            ["state", "backend"],
            registry=reg,
        )
        self._queue_depth = Gauge("editd_queue_depth", "Edits waiting to be applied.", registry=reg)
        self._submit_to_applied = Histogram(
            "editd_submit_to_applied_seconds",
            "Seconds from an edit's submission to its application.",
            buckets=SUBMIT_TO_APPLIED_BUCKETS,
            registry=reg,
        )
        self._verification_failures = Counter(
            "editd_verification_failures",
            "Edits whose verification failed.",
            ["backend"],
            registry=reg,
        )
        self._batches = Counter(
            "editd_batches", "Edit batches processed.", ["backend", "outcome"], registry=reg
        )
        self._backend_edits = Counter(
            "editd_backend_edits", "Edits given to a back-end.", ["backend"], registry=reg
        )
        self._escalations = Counter(
            "editd_escalations",
            "Edits a back-end refused or failed to verify, passed on to another back-end.",
            ["backend"],
            registry=reg,
        )
        self._failure_rate = Gauge(
            "editd_backend_verification_failure_rate",
            "Share of a back-end's recent edits that failed verification ([health] window).",
            ["backend"],
            registry=reg,
        )
        self._escalation_rate = Gauge(
            "editd_backend_escalation_rate",
            "Share of a back-end's recent edits escalated to another back-end.",
            ["backend"],
            registry=reg,
        )
        self._degraded = Gauge(
            "editd_backend_degraded",
            "1 while a back-end's recent failure or escalation rate is past its [health] limit.",
            ["backend"],
            registry=reg,
        )
        self._drift_top1 = Gauge(
            "editd_drift_top1_agreement",
            "Top-1 agreement with the base model on the probes.",
            registry=reg,
        )
        self._drift_kl = Gauge(
            "editd_drift_mean_kl", "Mean KL(base || edited) on the drift probes.", registry=reg
        )
        self._drift_retention = Gauge(
            "editd_drift_retention", "Retention of a sample of applied edits.", registry=reg
        )
        self._drift_runs = Counter(
            "editd_drift_runs", "Drift validation runs by outcome.", ["outcome"], registry=reg
        )
        self._model_load = Gauge(
            "editd_model_load_seconds", "Seconds the model took to load.", registry=reg
        )
        self._rollbacks = Counter("editd_rollbacks", "Drift rollbacks performed.", registry=reg)
        self._completions = Counter(
            "editd_completions", "Completion requests served.", registry=reg
        )
        self._completion_seconds = Histogram(
            "editd_completion_seconds",
            "Seconds a completion request took, to its last token.",
            buckets=COMPLETION_SECONDS_BUCKETS,
            registry=reg,
        )
        self._first_token_seconds = Histogram(
            "editd_completion_first_token_seconds",
            "Seconds from a completion request to its first generated token.",
            buckets=COMPLETION_SECONDS_BUCKETS,
            registry=reg,
        )
        self._tokens_per_second = Histogram(
            "editd_completion_tokens_per_second",
            "Generated tokens per second of one completion request.",
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=reg,
        )
        self._completion_tokens = Counter(
            "editd_completion_tokens", "Tokens generated for completion requests.", registry=reg
        )
        self._prompt_tokens = Counter(
            "editd_completion_prompt_tokens",
            "Prompt tokens read for completion requests.",
            registry=reg,
        )
        self._cancelled = Counter(
            "editd_completions_cancelled",
            "Streamed completion requests stopped because the client went away.",
            registry=reg,
        )
        self._feed_polls = Counter(
            "editd_feed_polls", "Feed polls by feed and outcome.", ["feed", "outcome"], registry=reg
        )
        self._feed_malformed = Counter(
            "editd_feed_items_malformed",
            "Feed items that could not be read.",
            ["feed"],
            registry=reg,
        )
        self._build = Info("editd_build", "The running editd build.", registry=reg)
        self._build.info({"version": version})
        self._checkpoint_age = _CheckpointAgeCollector(clock)
        reg.register(self._checkpoint_age)
        self._edit_series: set[tuple[str, str]] = set()
        self._edit_lock = threading.Lock()
        for outcome in DRIFT_OUTCOMES:
            self._drift_runs.labels(outcome=outcome)
        for backend in backend_names() if backends is None else backends:
            self._verification_failures.labels(backend=backend)
            self._backend_edits.labels(backend=backend)
            self._escalations.labels(backend=backend)
            self._degraded.labels(backend=backend).set(0)

    # --- verbs ---------------------------------------------------------------------

    def set_edit_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace the ``editd_edits`` series: ``{(state, backend): n}``.

        Series seen before but absent now are set to 0 (never left stale).
        """
        with self._edit_lock:
            for state, backend in self._edit_series - set(counts):
                self._edits.labels(state=state, backend=backend).set(0)
            for (state, backend), n in counts.items():
                self._edits.labels(state=state, backend=backend).set(n)
            self._edit_series |= set(counts)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def observe_submit_to_applied(self, seconds: float) -> None:
        self._submit_to_applied.observe(max(0.0, seconds))

    def verification_failed(self, backend: str, n: int = 1) -> None:
        self._verification_failures.labels(backend=backend).inc(n)

    def batch_finished(self, backend: str, outcome: str) -> None:
        self._batches.labels(backend=backend, outcome=outcome).inc()

    def backend_step(
        self,
        backend: str,
        *,
        edits: int,
        escalated: int,
        failure_rate: float | None,
        escalation_rate: float | None,
        degraded: bool,
    ) -> None:
        """One back-end step: its edit and escalation counts, and the window's rates."""
        self._backend_edits.labels(backend=backend).inc(edits)
        self._escalations.labels(backend=backend).inc(escalated)
        if failure_rate is not None:
            self._failure_rate.labels(backend=backend).set(failure_rate)
        if escalation_rate is not None:
            self._escalation_rate.labels(backend=backend).set(escalation_rate)
        self._degraded.labels(backend=backend).set(1 if degraded else 0)

    def drift_run(
        self, *, top1_agreement: float, mean_kl: float, retention: float | None, passed: bool
    ) -> None:
        """Record one drift validation run (retention None: no applied edits to sample)."""
        self._drift_top1.set(top1_agreement)
        self._drift_kl.set(mean_kl)
        if retention is not None:
            self._drift_retention.set(retention)
        self._drift_runs.labels(outcome="passed" if passed else "failed").inc()

    def checkpoint_written(self, timestamp: float | None = None) -> None:
        """The last good checkpoint's wall-clock time (default: now)."""
        self._checkpoint_age.set_last(time.time() if timestamp is None else timestamp)

    def model_loaded(self, seconds: float) -> None:
        self._model_load.set(seconds)

    def rolled_back(self) -> None:
        self._rollbacks.inc()

    def completions_served(self, n: int = 1) -> None:
        self._completions.inc(n)

    def completion_finished(
        self,
        *,
        seconds: float,
        first_token_seconds: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cancelled: bool = False,
    ) -> None:
        """One completion request's timings and token counts (first_token_seconds None:
        it generated no token)."""
        self._completion_seconds.observe(max(0.0, seconds))
        if first_token_seconds is not None:
            self._first_token_seconds.observe(max(0.0, first_token_seconds))
        if completion_tokens > 0 and seconds > 0:
            self._tokens_per_second.observe(completion_tokens / seconds)
        self._completion_tokens.inc(completion_tokens)
        self._prompt_tokens.inc(prompt_tokens)
        if cancelled:
            self._cancelled.inc()

    def feed_polled(self, feed: str, outcome: str, *, malformed: int = 0) -> None:
        """One poll of one feed: its outcome and the items that could not be read."""
        self._feed_polls.labels(feed=feed, outcome=outcome).inc()
        self._feed_malformed.labels(feed=feed).inc(malformed)

    # --- scraping ------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
