"""Back-end health: the window of recent outcomes, the degraded verdict and its events."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from daemon.config import HealthConfig, RouterConfig, load_config
from daemon.editors.base import EditOutcome
from daemon.editors.registry import HOOK, MELO
from daemon.engine.backend_health import BackendHealth, Outcome, outcome_of
from daemon.engine.dispatch import DispatchHooks, Step, dispatch
from daemon.engine.engine import Engine
from daemon.errors import ConfigError
from daemon.model.loading import load_model
from store.schema import Backend
from tests.daemon.service.test_dispatch import Scripted, _items


def _step(
    backend: Backend,
    applied: int = 0,
    unverified: int = 0,
    refused: int = 0,
    escalate: bool = True,
    tag: str = "",
) -> Step:
    """A step of ``applied + unverified + refused`` edits; the failures escalate if asked."""
    taken = {f"{tag}a{i}": EditOutcome(f"{tag}a{i}", True) for i in range(applied)}
    bad = [f"{tag}u{i}" for i in range(unverified)]
    no = [f"{tag}r{i}" for i in range(refused)]
    ids = (*taken, *bad, *no)
    return Step(
        backend,
        ids,
        taken,
        {e: "why" for e in (*bad, *no)},
        unverified=frozenset(bad),
        escalated=frozenset((*bad, *no)) if escalate else frozenset(),
    )


def test_outcome_of_each_edit_of_a_step() -> None:
    step = _step(HOOK, applied=1, unverified=1, refused=1)
    assert [outcome_of(step, e) for e in step.edit_ids] == [
        Outcome.APPLIED,
        Outcome.UNVERIFIED,
        Outcome.REFUSED,
    ]


def test_no_verdict_before_min_edits_then_degraded_once_and_recovered_once() -> None:
    config = HealthConfig(window_edits=10, min_edits=4, max_verification_failure_rate=0.25)
    changes: list[bool] = []
    health = BackendHealth(config, ["hook", "melo"], on_change=lambda r: changes.append(r.degraded))
    with structlog.testing.capture_logs() as logs:
        rates = health.record(_step(HOOK, unverified=3, escalate=False))
        assert rates.edits == 3 and not rates.degraded  # 3 < min_edits
        assert rates.verification_failure_rate == 1.0
        rates = health.record(_step(HOOK, applied=1, tag="b"))
        assert rates.degraded and rates.verification_failure_rate == 0.75
        assert rates.escalation_rate == 0.0
        assert rates.reasons == ("3 of the last 4 edits failed verification (> 25%)",)
        health.record(_step(HOOK, unverified=1, tag="c", escalate=False))  # still bad
        # the window keeps the last 10: seven good edits push the failures out
        rates = health.record(_step(HOOK, applied=8, tag="d"))
        assert rates.edits == 10 and rates.verification_failures == 1 and not rates.degraded
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("backend_degraded", "warning"), ("backend_recovered", "info")]
    assert changes == [True, False]
    snapshot = health.snapshot()
    assert set(snapshot) == {"hook", "melo"}
    assert snapshot["melo"].edits == 0 and snapshot["melo"].verification_failure_rate is None
    assert snapshot["hook"].to_json_dict()["window_edits"] == 10


def test_new_thresholds_and_window_apply_at_once_and_announce_changed_verdicts() -> None:
    """SIGHUP's path: a looser threshold clears a verdict, a smaller window keeps the
    newest edits, a stricter one sets it again; each change is announced once."""
    config = HealthConfig(window_edits=10, min_edits=4, max_verification_failure_rate=0.25)
    changes: list[tuple[str, bool]] = []
    health = BackendHealth(
        config, ["hook", "melo"], on_change=lambda r: changes.append((r.backend, r.degraded))
    )
    health.record(_step(HOOK, unverified=4, escalate=False))
    health.record(_step(HOOK, applied=4, tag="b"))
    assert health.snapshot()["hook"].degraded and changes == [("hook", True)]
    health.reconfigure(replace(config, max_verification_failure_rate=0.6))
    assert not health.snapshot()["hook"].degraded and changes[-1] == ("hook", False)
    health.reconfigure(replace(config, window_edits=4, min_edits=4))
    rates = health.snapshot()["hook"]
    assert rates.edits == 4 and rates.verification_failure_rate == 0.0  # the newest 4
    assert not rates.degraded and len(changes) == 2
    health.record(_step(HOOK, unverified=2, escalate=False, tag="c"))
    assert health.snapshot()["hook"].degraded  # 2 of the newest 4 > 0.25
    assert health.config.window_edits == 4 and changes[-1] == ("hook", True)


def test_escalations_alone_make_a_back_end_degraded() -> None:
    """Refusals that escalate (no verification failure) count against the escalation rate."""
    config = HealthConfig(window_edits=20, min_edits=5, max_escalation_rate=0.5)
    health = BackendHealth(config, ["hook"])
    rates = health.record(_step(HOOK, applied=2, refused=3))
    assert rates.degraded and rates.refusals == 3 and rates.escalation_rate == 0.6
    assert rates.verification_failure_rate == 0.0
    assert rates.reasons == ("3 of the last 5 edits escalated to another back-end (> 50%)",)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("max_verification_failure_rate = 2.0", "max_verification_failure_rate"),
        ("max_escalation_rate = -0.1", "max_escalation_rate"),
        ("window_edits = 5\nmin_edits = 6", "min_edits"),
        ("window_edits = 0", "window_edits"),
    ],
)
def test_health_config_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[health]\n{body}\n")
    with pytest.raises(ConfigError, match=f"key 'health.{key}'"):
        load_config(path, env={})


def test_a_back_end_whose_edits_never_verify_is_degraded(micro_world: Path) -> None:
    """Real dispatch on the micro model: scripted back-ends accept edits without changing
    the model, so greedy verification fails every one; the hook's go on to MELO."""
    engine = Engine(
        load_model(str(micro_world), device="cpu"),
        {HOOK: Scripted("hook"), MELO: Scripted("melo")},
    )
    health = BackendHealth(HealthConfig(min_edits=2), ["hook", "melo"])
    steps: list[Step] = []

    def after_step(step: Step) -> None:
        steps.append(step)
        health.record(step)

    hooks = DispatchHooks(after_step=after_step)
    result = dispatch(engine, _items(), RouterConfig(), verify=True, hooks=hooks)
    hook_step = next(s for s in steps if s.backend is HOOK)
    assert hook_step.unverified and hook_step.unverified == hook_step.escalated
    assert set(result.escalated) == set(hook_step.escalated)
    rates = health.snapshot()
    assert rates["hook"].degraded
    assert rates["hook"].verification_failure_rate == 1.0 and rates["hook"].escalation_rate == 1.0
    assert rates["melo"].degraded and rates["melo"].escalation_rate == 0.0
