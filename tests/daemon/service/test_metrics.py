"""DaemonMetrics: values as a Prometheus scraper parses them from the exposition."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.metrics import SUBMIT_TO_APPLIED_BUCKETS, DaemonMetrics

Labels = tuple[tuple[str, str], ...]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(metrics: DaemonMetrics) -> dict[tuple[str, Labels], float]:
    """Every sample of the exposition: (sample name, sorted labels) -> value."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for s in family.samples
    }


def families(metrics: DaemonMetrics) -> dict[str, str]:
    """Family name -> type (the text format shows an info as a gauge; ``_created`` left out)."""
    body, _ = metrics.exposition()
    return {
        f.name: f.type
        for f in text_string_to_metric_families(body.decode("utf-8"))
        if not f.name.endswith("_created")
    }


def test_every_documented_family_is_exposed() -> None:
    """All metrics exist from the start with the documented types."""
    types = families(DaemonMetrics("1.2.3"))
    assert types == {
        "editd_edits": "gauge",
        "editd_queue_depth": "gauge",
        "editd_submit_to_applied_seconds": "histogram",
        "editd_verification_failures": "counter",
        "editd_batches": "counter",
        "editd_backend_edits": "counter",
        "editd_escalations": "counter",
        "editd_backend_verification_failure_rate": "gauge",
        "editd_backend_escalation_rate": "gauge",
        "editd_backend_degraded": "gauge",
        "editd_drift_top1_agreement": "gauge",
        "editd_drift_mean_kl": "gauge",
        "editd_drift_retention": "gauge",
        "editd_drift_runs": "counter",
        "editd_checkpoint_age_seconds": "gauge",
        "editd_model_load_seconds": "gauge",
        "editd_rollbacks": "counter",
        "editd_completions": "counter",
        "editd_completion_seconds": "histogram",
        "editd_completion_first_token_seconds": "histogram",
        "editd_completion_tokens_per_second": "histogram",
        "editd_completion_tokens": "counter",
        "editd_completion_prompt_tokens": "counter",
        "editd_completions_cancelled": "counter",
        "editd_feed_polls": "counter",
        "editd_feed_items_malformed": "counter",
        "editd_build_info": "gauge",
    }


def test_private_registry_leaves_the_global_one_alone() -> None:
    """Two instances coexist and nothing lands in prometheus_client's global REGISTRY."""
    DaemonMetrics("a")
    DaemonMetrics("b")
    assert REGISTRY.get_sample_value("editd_queue_depth") is None


def test_build_info_and_initial_series() -> None:
    """build_info carries the version; drift outcomes and backends start at zero."""
    samples = scrape(DaemonMetrics("0.1.0", backends=("melo", "hook")))
    assert samples[("editd_build_info", (("version", "0.1.0"),))] == 1.0
    assert samples[("editd_drift_runs_total", (("outcome", "passed"),))] == 0.0
    assert samples[("editd_drift_runs_total", (("outcome", "failed"),))] == 0.0
    assert samples[("editd_verification_failures_total", (("backend", "hook"),))] == 0.0
    assert samples[("editd_verification_failures_total", (("backend", "melo"),))] == 0.0


def test_edit_counts_replace_previous_counts() -> None:
    """Counts are set, not added; a series that disappears from the store drops to 0."""
    metrics = DaemonMetrics("x")
    metrics.set_edit_counts({("applied", "melo"): 5, ("queued", "hook"): 2})
    metrics.set_edit_counts({("applied", "melo"): 7})
    samples = scrape(metrics)
    assert samples[("editd_edits", (("backend", "melo"), ("state", "applied")))] == 7.0
    assert samples[("editd_edits", (("backend", "hook"), ("state", "queued")))] == 0.0


def test_gauges_and_counters_after_calls() -> None:
    """Each verb moves exactly its own metric."""
    metrics = DaemonMetrics("x")
    metrics.set_queue_depth(12)
    metrics.verification_failed("hook")
    metrics.verification_failed("hook", 2)
    metrics.batch_finished("melo", "applied")
    metrics.batch_finished("melo", "applied")
    metrics.batch_finished("hook", "failed")
    metrics.model_loaded(3.5)
    metrics.rolled_back()
    metrics.completions_served()
    metrics.completions_served(4)
    s = scrape(metrics)
    assert s[("editd_queue_depth", ())] == 12.0
    assert s[("editd_verification_failures_total", (("backend", "hook"),))] == 3.0
    assert s[("editd_batches_total", (("backend", "melo"), ("outcome", "applied")))] == 2.0
    assert s[("editd_batches_total", (("backend", "hook"), ("outcome", "failed")))] == 1.0
    assert s[("editd_model_load_seconds", ())] == 3.5
    assert s[("editd_rollbacks_total", ())] == 1.0
    assert s[("editd_completions_total", ())] == 5.0


def test_backend_steps_count_edits_and_set_the_window_rates() -> None:
    """Counts add up over steps; the rates and the degraded flag are the latest ones."""
    metrics = DaemonMetrics("x", backends=("hook", "melo"))
    assert scrape(metrics)[("editd_backend_degraded", (("backend", "hook"),))] == 0.0
    metrics.backend_step(
        "hook", edits=4, escalated=3, failure_rate=0.5, escalation_rate=0.75, degraded=True
    )
    metrics.backend_step(
        "hook", edits=6, escalated=0, failure_rate=0.2, escalation_rate=0.3, degraded=False
    )
    metrics.backend_step(
        "melo", edits=3, escalated=0, failure_rate=None, escalation_rate=None, degraded=True
    )
    s = scrape(metrics)
    hook, melo = (("backend", "hook"),), (("backend", "melo"),)
    assert s[("editd_backend_edits_total", hook)] == 10.0
    assert s[("editd_escalations_total", hook)] == 3.0
    assert s[("editd_backend_verification_failure_rate", hook)] == 0.2
    assert s[("editd_backend_escalation_rate", hook)] == 0.3
    assert s[("editd_backend_degraded", hook)] == 0.0
    assert s[("editd_backend_degraded", melo)] == 1.0
    assert ("editd_backend_verification_failure_rate", melo) not in s


def test_submit_to_applied_histogram() -> None:
    """Observations fall into buckets from 0.1 s to 1 h; negatives clamp to 0."""
    metrics = DaemonMetrics("x")
    for seconds in (0.05, 3.0, 45.0, 7200.0, -1.0):
        metrics.observe_submit_to_applied(seconds)
    s = scrape(metrics)
    name = "editd_submit_to_applied_seconds"
    assert SUBMIT_TO_APPLIED_BUCKETS[0] == 0.1 and SUBMIT_TO_APPLIED_BUCKETS[-1] == 3600.0
    assert s[(name + "_count", ())] == 5.0
    assert s[(name + "_sum", ())] == pytest.approx(0.05 + 3.0 + 45.0 + 7200.0)
    assert s[(name + "_bucket", (("le", "0.1"),))] == 2.0
    assert s[(name + "_bucket", (("le", "5.0"),))] == 3.0
    assert s[(name + "_bucket", (("le", "60.0"),))] == 4.0
    assert s[(name + "_bucket", (("le", "3600.0"),))] == 4.0
    assert s[(name + "_bucket", (("le", "+Inf"),))] == 5.0


def test_drift_runs() -> None:
    """A run sets the three gauges and counts its outcome; no retention keeps the last one."""
    metrics = DaemonMetrics("x")
    metrics.drift_run(top1_agreement=0.99, mean_kl=0.01, retention=0.95, passed=True)
    metrics.drift_run(top1_agreement=0.8, mean_kl=0.4, retention=None, passed=False)
    s = scrape(metrics)
    assert s[("editd_drift_top1_agreement", ())] == 0.8
    assert s[("editd_drift_mean_kl", ())] == 0.4
    assert s[("editd_drift_retention", ())] == 0.95
    assert s[("editd_drift_runs_total", (("outcome", "passed"),))] == 1.0
    assert s[("editd_drift_runs_total", (("outcome", "failed"),))] == 1.0


def test_checkpoint_age_is_computed_at_scrape_time() -> None:
    """No sample before the first checkpoint; afterwards the age follows the clock."""
    clock = FakeClock(1000.0)
    metrics = DaemonMetrics("x", clock=clock)
    assert ("editd_checkpoint_age_seconds", ()) not in scrape(metrics)
    metrics.checkpoint_written(990.0)
    assert scrape(metrics)[("editd_checkpoint_age_seconds", ())] == 10.0
    clock.now = 1060.0
    assert scrape(metrics)[("editd_checkpoint_age_seconds", ())] == 70.0
    metrics.checkpoint_written(2000.0)  # a clock step backwards never gives a negative age
    age = scrape(metrics)[("editd_checkpoint_age_seconds", ())]
    assert age == 0.0 and not math.isnan(age)


def test_checkpoint_written_defaults_to_now() -> None:
    """Without a timestamp the checkpoint is 'now' (age about zero with the real clock)."""
    metrics = DaemonMetrics("x")
    metrics.checkpoint_written()
    assert 0.0 <= scrape(metrics)[("editd_checkpoint_age_seconds", ())] < 5.0


def test_completion_requests_and_feed_polls() -> None:
    """A finished request adds its tokens and observes its latency, first token and
    tokens/s; a cancelled one is counted; feed polls count by feed and outcome."""
    metrics = DaemonMetrics("x")
    metrics.completion_finished(
        seconds=2.0, first_token_seconds=0.2, prompt_tokens=7, completion_tokens=10
    )
    metrics.completion_finished(
        seconds=0.5, first_token_seconds=None, prompt_tokens=3, completion_tokens=0, cancelled=True
    )
    metrics.feed_polled("news", "error", malformed=2)
    metrics.feed_polled("news", "ok")
    s = scrape(metrics)
    assert s[("editd_completion_tokens_total", ())] == 10.0
    assert s[("editd_completion_prompt_tokens_total", ())] == 10.0
    assert s[("editd_completion_seconds_count", ())] == 2.0
    assert s[("editd_completion_seconds_sum", ())] == 2.5
    assert s[("editd_completion_first_token_seconds_count", ())] == 1.0
    assert s[("editd_completion_tokens_per_second_sum", ())] == 5.0
    assert s[("editd_completions_cancelled_total", ())] == 1.0
    assert s[("editd_feed_polls_total", (("feed", "news"), ("outcome", "error")))] == 1.0
    assert s[("editd_feed_polls_total", (("feed", "news"), ("outcome", "ok")))] == 1.0
    assert s[("editd_feed_items_malformed_total", (("feed", "news"),))] == 2.0
