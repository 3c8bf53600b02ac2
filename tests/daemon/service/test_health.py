"""A back-end that stops working is reported, not silently routed around."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.service.conftest import DaemonProcess, write_config


def test_a_hook_whose_edits_never_take_is_reported_degraded(
    micro_world: Path,
    tmp_path: Path,
    world_edits: list[dict[str, Any]],
    daemon_factory: list[DaemonProcess],
) -> None:
    """A hook that cannot move its targets (one optimisation step at a negligible rate):
    MELO takes every edit after escalation, and /v1/status, /metrics and the log all say
    the hook is degraded."""
    config = write_config(
        tmp_path,
        micro_world,
        editors__hook={
            "layers": [1],
            "key_position": "prompt_last",
            "covariance_tokens": 20000,
            "target_steps": 1,
            "target_learning_rate": 1e-6,
        },
        health={"min_edits": 4, "window_edits": 50},
    )
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    status = daemon.request("GET", "/v1/status").json()
    assert status["backend_health"]["hook"]["window_edits"] == 0
    assert status["backend_health"]["hook"]["degraded"] is False

    edits = [{**e, "backend": "hook"} for e in world_edits[:8]]
    edits = [{k: v for k, v in e.items() if k != "locality"} for e in edits]
    ids = daemon.submit(edits)
    states = daemon.wait_settled(ids)
    assert set(states.values()) == {"applied"}, states
    assert {daemon.edit(i)["backend"] for i in ids} == {"melo"}

    health = daemon.request("GET", "/v1/status").json()["backend_health"]
    hook, melo = health["hook"], health["melo"]
    assert hook["window_edits"] == 8 and hook["escalations"] == 8
    assert hook["escalation_rate"] == 1.0 and hook["degraded"] is True
    assert any("escalated" in reason for reason in hook["reasons"])
    assert melo["window_edits"] == 8 and melo["degraded"] is False

    body = daemon.request("GET", "/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("editd_backend_degraded", (("backend", "hook"),))] == 1.0
    assert samples[("editd_backend_degraded", (("backend", "melo"),))] == 0.0
    assert samples[("editd_escalations_total", (("backend", "hook"),))] == 8.0
    assert samples[("editd_backend_edits_total", (("backend", "melo"),))] == 8.0
    assert samples[("editd_backend_escalation_rate", (("backend", "hook"),))] == 1.0

    events = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if "{" in line]
    degraded = [e for e in events if e.get("event") == "backend_degraded"]
    assert len(degraded) == 1 and degraded[0]["backend"] == "hook"
    assert degraded[0]["level"] == "warning"
    assert daemon.terminate() == 0
