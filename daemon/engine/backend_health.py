"""Back-end health: how often each back-end's recent edits fail verification or escalate.

A back-end can stop working without an error: a transformers upgrade once made
every hook edit fail verification, and the router quietly escalated all of them to
MELO. :class:`BackendHealth` keeps, per back-end, the outcome of the last
``[health] window_edits`` edits it was given (one :class:`~daemon.engine.dispatch.Step`
at a time) and calls a back-end *degraded* when, over at least ``min_edits`` of
them, the share that failed verification passes ``max_verification_failure_rate``
or the share escalated to another back-end passes ``max_escalation_rate``.

The verdict changes are logged once each (``backend_degraded`` as a warning,
``backend_recovered``), and :meth:`BackendHealth.snapshot` gives the rates for
``/v1/status`` and the metrics. The window lives in memory: it starts empty at
each start of the daemon.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from daemon.config import HealthConfig
from daemon.engine.dispatch import Step

log = structlog.get_logger()


class Outcome(StrEnum):
    """What became of one edit a back-end was given."""

    APPLIED = "applied"
    UNVERIFIED = "unverified"  # accepted, then failed verification (retracted)
    REFUSED = "refused"  # refused by the editor itself


def outcome_of(step: Step, edit_id: str) -> Outcome:
    """What ``step`` did with ``edit_id``."""
    if edit_id in step.taken:
        return Outcome.APPLIED
    return Outcome.UNVERIFIED if edit_id in step.unverified else Outcome.REFUSED


@dataclass(frozen=True)
class BackendRates:
    """One back-end's window: counts, rates (None before any edit) and the verdict."""

    backend: str
    edits: int
    verification_failures: int
    refusals: int
    escalations: int
    degraded: bool
    reasons: tuple[str, ...]

    @property
    def verification_failure_rate(self) -> float | None:
        return None if not self.edits else self.verification_failures / self.edits

    @property
    def escalation_rate(self) -> float | None:
        return None if not self.edits else self.escalations / self.edits

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "window_edits": self.edits,
            "verification_failures": self.verification_failures,
            "refusals": self.refusals,
            "escalations": self.escalations,
            "verification_failure_rate": self.verification_failure_rate,
            "escalation_rate": self.escalation_rate,
            "degraded": self.degraded,
            "reasons": list(self.reasons),
        }


class BackendHealth:
    """The recent outcomes of each back-end's edits and the degraded verdict (thread-safe)."""

    def __init__(
        self,
        config: HealthConfig,
        backends: Iterable[str],
        *,
        on_change: Callable[[BackendRates], None] | None = None,
    ) -> None:
        self.config = config
        self._window: dict[str, deque[tuple[Outcome, bool]]] = {
            b: deque(maxlen=config.window_edits) for b in backends
        }
        self._degraded: dict[str, bool] = dict.fromkeys(self._window, False)
        self._on_change = on_change
        self._lock = threading.Lock()

    def record(self, step: Step) -> BackendRates:
        """Add one back-end step's edits; the back-end's rates after it."""
        backend = step.backend.value
        with self._lock:
            window = self._window.setdefault(backend, deque(maxlen=self.config.window_edits))
            window.extend((outcome_of(step, e), e in step.escalated) for e in step.edit_ids)
            rates = self._rates(backend)
            changed = rates.degraded != self._degraded.get(backend, False)
            self._degraded[backend] = rates.degraded
        if changed:
            self._announce(rates)
        return rates

    def reconfigure(self, config: HealthConfig) -> None:
        """Take new thresholds and window size (SIGHUP); a shrunk window keeps its newest
        edits. Verdicts that change under the new thresholds are announced."""
        with self._lock:
            self.config = config
            self._window = {
                b: deque(w, maxlen=config.window_edits) for b, w in self._window.items()
            }
            changed = []
            for backend in self._window:
                rates = self._rates(backend)
                if rates.degraded != self._degraded.get(backend, False):
                    changed.append(rates)
                self._degraded[backend] = rates.degraded
        for rates in changed:
            self._announce(rates)

    def snapshot(self) -> dict[str, BackendRates]:
        """Every back-end's current rates."""
        with self._lock:
            return {backend: self._rates(backend) for backend in self._window}

    def _rates(self, backend: str) -> BackendRates:
        window = self._window[backend]
        edits = len(window)
        unverified = sum(1 for outcome, _ in window if outcome is Outcome.UNVERIFIED)
        refused = sum(1 for outcome, _ in window if outcome is Outcome.REFUSED)
        escalated = sum(1 for _, moved in window if moved)
        cfg = self.config
        reasons: list[str] = []
        if edits >= cfg.min_edits:
            if unverified / edits > cfg.max_verification_failure_rate:
                reasons.append(
                    f"{unverified} of the last {edits} edits failed verification "
                    f"(> {cfg.max_verification_failure_rate:.0%})"
                )
            if escalated / edits > cfg.max_escalation_rate:
                reasons.append(
                    f"{escalated} of the last {edits} edits escalated to another back-end "
                    f"(> {cfg.max_escalation_rate:.0%})"
                )
        return BackendRates(
            backend=backend,
            edits=edits,
            verification_failures=unverified,
            refusals=refused,
            escalations=escalated,
            degraded=bool(reasons),
            reasons=tuple(reasons),
        )

    def _announce(self, rates: BackendRates) -> None:
        fields = {
            "backend": rates.backend,
            "window_edits": rates.edits,
            "verification_failure_rate": rates.verification_failure_rate,
            "escalation_rate": rates.escalation_rate,
        }
        if rates.degraded:
            log.warning("backend_degraded", reasons=list(rates.reasons), **fields)
        else:
            log.info("backend_recovered", **fields)
        if self._on_change is not None:
            self._on_change(rates)
