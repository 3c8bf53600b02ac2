"""The daemon on a real pretrained model: SmolLM2-135M-Instruct, imported from its wheel.

Only the model, the paths and (to fit the default test run) the hook's layers and a
small covariance budget are configured: drift probes, the covariance text and the
gate floor come from the defaults for a model that is not a fact world. Hook and
MELO edits from CounterFact are applied, verified, served, retracted, checked for
drift and checkpointed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.daemon.service.conftest import DaemonProcess, write_toml

RECORDS = (0, 1, 7, 13)  # CounterFact edit records; the first two go to the hook


def _edits(shared_dir: Path) -> list[dict[str, Any]]:
    records = json.loads((shared_dir / "data/counterfact/counterfact-edit.json").read_text())
    chosen = [records[i] for i in RECORDS]
    return [
        {
            "id": f"cf-{r['case_id']}",
            "prompt": r["prompt"],
            "target": " " + r["target_new"],
            "subject": r["subject"],
            "backend": "hook" if k < 2 else "auto",  # auto: MELO, its keys at the subject
        }
        for k, r in enumerate(chosen)
    ]


def test_smollm2_edits_verify_serve_retract_and_checkpoint(
    smollm2_dir: Path, shared_dir: Path, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    var = tmp_path / "var"
    config = write_toml(
        tmp_path,
        {
            "model": {"name_or_path": str(smollm2_dir)},
            "store": {"path": str(var / "editd.sqlite3")},
            "checkpoints": {"dir": str(var / "checkpoints")},
            "editors.hook": {
                "layers": [6, 7],
                "key_position": "subject_last",
                "covariance_tokens": 4000,
            },
            "worker": {"batch_size": 4, "max_wait_s": 0.2, "poll_interval_s": 0.05},
            "log": {"level": "info", "format": "json"},
        },
    )
    daemon = DaemonProcess(config)
    daemon_factory.append(daemon)
    daemon.start()
    edits = _edits(shared_dir)
    prompts = [e["prompt"] for e in edits]
    before = daemon.complete(prompts, max_tokens=4)
    for edit, answer in zip(edits, before, strict=True):
        assert not answer.startswith(edit["target"]), (edit, answer)  # a real change

    ids = daemon.submit(edits)
    assert daemon.wait_settled(ids) == dict.fromkeys(ids, "applied")
    records = {i: daemon.edit(i) for i in ids}
    assert [records[i]["backend"] for i in ids] == ["hook", "hook", "melo", "melo"]
    assert "MELO keys at the subject" in json.dumps(records[ids[2]]["result"])
    assert all(records[i]["result"]["verification"]["passed"] for i in ids)
    after = daemon.complete(prompts, max_tokens=4)
    for edit, answer in zip(edits, after, strict=True):
        assert answer.startswith(edit["target"]), (edit, answer)

    for victim in (ids[0], ids[2]):  # one edit of each back-end
        assert daemon.request("DELETE", f"/v1/edits/{victim}").status_code == 200
    now = daemon.complete(prompts, max_tokens=4)
    assert [now[0], now[2]] == [before[0], before[2]]
    assert [now[1], now[3]] == [after[1], after[3]]

    drift = daemon.request("POST", "/v1/drift")
    assert drift.status_code == 200, drift.text
    assert drift.json()["n"] == 672 and drift.json()["passed"] is True, drift.json()
    status = daemon.request("GET", "/v1/status").json()
    assert status["backend_health"]["hook"]["verification_failures"] == 0
    assert daemon.terminate() == 0
    assert any((var / "checkpoints").iterdir())
    events = [json.loads(x) for x in daemon.log_path.read_text().splitlines() if x[:1] == "{"]
    names = {e.get("event") for e in events}
    assert {"drift_probes_common_facts", "common_facts_known", "hook_floor_calibrated"} <= names
