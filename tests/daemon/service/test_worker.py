"""The worker's routing, escalation, supersession and failure paths, in a real daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.service import Daemon
from tests.daemon.service.conftest import write_config


def _settle(daemon: Daemon, timeout: float = 120) -> None:
    """Wait for a batch to finish and no edit due now to be waiting or in progress."""
    assert daemon.store is not None
    done = daemon.batches_done
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with daemon.store.read() as db:
            (busy,) = db.execute(
                "SELECT COUNT(*) FROM edits WHERE status = 'applying' "
                "OR (status = 'queued' AND schedule = 'now')"
            ).fetchone()
        if busy == 0 and daemon.batches_done > done:
            return
        time.sleep(0.05)
    raise AssertionError("queue did not drain")


@pytest.fixture
def make_daemon(micro_world: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(**sections: dict[str, Any]) -> Daemon:
        folder = tmp_path / f"d{len(started)}"
        sections.setdefault("scheduler", {"enabled": False})
        daemon = Daemon(load_config(write_config(folder, micro_world, **sections)))
        daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for d in started:
        d.stop(checkpoint=False)


def test_hook_edit_that_fails_verification_escalates_to_melo(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    # one optimisation step at a tiny rate: the hook back-end cannot make the edit take
    daemon = make_daemon(editors__hook={"target_steps": 1, "target_learning_rate": 1e-4})
    edits = [dict(e) for e in world_edits[:2]]
    daemon.submit(edits)
    _settle(daemon)
    for e in edits:
        record = daemon.get_edit(e["id"])
        assert record.status.value == "applied"
        assert record.backend == "melo"
        assert record.result is not None
        assert record.result["route"]["backend"] == "hook"
        assert record.result["editor"]["escalated_from"]["backend"] == "hook"
        assert "verification failed" in record.result["editor"]["escalated_from"]["reason"]
    assert daemon.engine is not None
    outs = daemon.engine.greedy([e["prompt"] for e in edits], 4)
    assert [o.split()[0].strip(".") for o in outs] == [e["target"].split()[0] for e in edits]


def test_without_escalation_the_edit_fails_with_the_reason(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    daemon = make_daemon(
        editors__hook={"target_steps": 1, "target_learning_rate": 1e-4},
        router={"escalate_to_melo": False},
    )
    edit = dict(world_edits[0])
    daemon.submit([edit])
    _settle(daemon)
    record = daemon.get_edit(edit["id"])
    assert record.status.value == "failed"
    assert "hook: verification failed" in (record.error or "")
    assert daemon.engine is not None and daemon.engine.applied_ids()


def test_supersedes_retracts_the_earlier_edit(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    daemon = make_daemon(router={"default_backend": "melo"})
    first = dict(world_edits[0])
    daemon.submit([first])
    _settle(daemon)
    second = {**world_edits[1], "supersedes": first["id"]}
    daemon.submit([second])
    _settle(daemon)
    assert daemon.get_edit(first["id"]).status.value == "superseded"
    assert daemon.get_edit(second["id"]).status.value == "applied"
    assert daemon.engine is not None
    held = daemon.engine.applied_ids()
    assert first["id"] not in [i for ids in held.values() for i in ids]


def test_a_disabled_backend_fails_the_edit_and_nightly_edits_wait(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    daemon = make_daemon(router={"backends": ["melo"]})
    forced = {**world_edits[0], "backend": "hook"}
    nightly = {**world_edits[1], "schedule": "nightly"}
    auto = dict(world_edits[2])
    daemon.submit([forced, nightly, auto])
    _settle(daemon)
    assert daemon.get_edit(forced["id"]).status.value == "failed"
    assert "not enabled" in (daemon.get_edit(forced["id"]).error or "")
    assert daemon.get_edit(auto["id"]).backend == "melo"  # auto never picks a missing one
    assert daemon.get_edit(nightly["id"]).status.value == "queued"
    from daemon.scheduler import nightly_release

    assert nightly_release(daemon) == 1
    _settle(daemon)
    assert daemon.get_edit(nightly["id"]).status.value == "applied"
