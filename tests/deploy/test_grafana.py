"""``deploy/grafana/editd.json``: valid Grafana JSON over a templated Prometheus data
source, and every metric its PromQL names is one the daemon exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.service.metrics import DaemonMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "editd.json"

PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, label names and
    values, grouping lists and range selectors are not metric names)."""
    text = STRINGS.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = {m for m in NAME.findall(text) if m.lower() not in PROMQL_WORDS}
    return {n for n in names if not re.fullmatch(r"\d+(e\d+)?", n)}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_metrics(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """Every expression of the dashboard (panel targets, variable queries) -> its metrics."""
    found: dict[str, set[str]] = {}
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found[target["expr"]] = metric_names(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition") or ""
        found.update({query: set(LABEL_VALUES.findall(query))} if query else {})
    return found


def exported_names(exposition: str) -> set[str]:
    """The series names a Prometheus text exposition holds: its samples, and for every
    declared family the names its type exports (a labelled family may have no sample yet)."""
    names = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        names |= {family + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def exposition() -> str:
    """A daemon's ``/metrics`` after one of each thing it counts."""
    metrics = DaemonMetrics("test", backends=["hook", "melo"])
    metrics.set_edit_counts({("applied", "melo"): 3, ("failed", "hook"): 1})
    metrics.set_queue_depth(2)
    metrics.observe_submit_to_applied(1.5)
    metrics.verification_failed("hook")
    metrics.batch_finished("melo", "applied")
    metrics.backend_step(
        "melo", edits=2, escalated=1, failure_rate=0.1, escalation_rate=0.2, degraded=False
    )
    metrics.drift_run(top1_agreement=0.99, mean_kl=0.01, retention=1.0, passed=True)
    metrics.checkpoint_written()
    metrics.model_loaded(3.0)
    metrics.rolled_back()
    metrics.completions_served()
    metrics.completion_finished(
        seconds=0.5, first_token_seconds=0.1, prompt_tokens=5, completion_tokens=10
    )
    metrics.feed_polled("news", "error", malformed=1)
    return metrics.exposition()[0].decode()


def test_the_dashboard_is_grafana_json_over_a_templated_prometheus(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_every_metric_the_dashboard_names_is_exported(
    dashboard: dict[str, Any], exposition: str
) -> None:
    exported = exported_names(exposition)
    used = dashboard_metrics(dashboard)
    assert sum(len(names) for names in used.values()) >= 30
    missing = {expr: names - exported for expr, names in used.items() if names - exported}
    assert not missing


def test_the_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    names = set().union(*dashboard_metrics(dashboard).values())
    for wanted in [
        "editd_queue_depth",
        "editd_edits",
        "editd_backend_verification_failure_rate",
        "editd_backend_escalation_rate",
        "editd_submit_to_applied_seconds_bucket",
        "editd_completion_seconds_bucket",
        "editd_completion_tokens_total",
        "editd_drift_top1_agreement",
        "editd_drift_mean_kl",
        "editd_checkpoint_age_seconds",
        "editd_feed_polls_total",
    ]:
        assert wanted in names, wanted


def test_an_unexported_metric_is_caught(exposition: str) -> None:
    """The check fails for a dashboard naming a metric the daemon does not export."""
    expr = (
        'sum by (backend) (rate(editd_nope_total{state="applied", x=~"$y"}[$__rate_interval]))'
        " / on (backend) group_left editd_queue_depth + up offset 5m"
    )
    assert metric_names(expr) == {"editd_nope_total", "editd_queue_depth", "up"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m])))") == {
        "a_bucket"
    }
    assert metric_names("editd_queue_depth") - exported_names(exposition) == set()
    assert metric_names(expr) - exported_names(exposition) == {"editd_nope_total", "up"}
