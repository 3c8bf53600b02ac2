"""The worker's routing, escalation, supersession and failure paths, in a real daemon."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from daemon.api.app import create_app
from daemon.config import load_config
from daemon.errors import StoreIntegrityError
from daemon.service.daemon import Daemon
from daemon.service.worker import BatchReport
from store import editlog
from store.db import Store
from store.queue import EditQueue
from store.schema import SourceKind
from tests.daemon.service.conftest import settle, write_config


def test_hook_edit_that_fails_verification_escalates_to_melo(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    # one optimisation step at a tiny rate: the hook back-end cannot make the edit take
    daemon = make_daemon(editors__hook={"target_steps": 1, "target_learning_rate": 1e-4})
    edits = [dict(e) for e in world_edits[:2]]
    daemon.submit(edits)
    settle(daemon)
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
    settle(daemon)
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
    settle(daemon)
    second = {**world_edits[1], "supersedes": first["id"]}
    daemon.submit([second])
    settle(daemon)
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
    settle(daemon)
    assert daemon.get_edit(forced["id"]).status.value == "failed"
    assert "not enabled" in (daemon.get_edit(forced["id"]).error or "")
    assert daemon.get_edit(auto["id"]).backend == "melo"  # auto never picks a missing one
    assert daemon.get_edit(nightly["id"]).status.value == "queued"
    from daemon.service.scheduler import nightly_release

    assert nightly_release(daemon) == 1
    settle(daemon)
    assert daemon.get_edit(nightly["id"]).status.value == "applied"


def _held(daemon: Daemon) -> list[str]:
    """Every edit id the live model holds (on any back-end)."""
    assert daemon.engine is not None
    return [i for ids in daemon.engine.applied_ids().values() for i in ids]


def _answer(daemon: Daemon, edit: dict[str, Any]) -> str:
    """The first word of the model's greedy continuation of the edit's prompt."""
    assert daemon.engine is not None
    (out,) = daemon.engine.greedy([edit["prompt"]], 4)
    return out.split()[0].strip(".,")


def _wait(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _same_fact(edits: list[dict[str, Any]], edit: dict[str, Any], n: int) -> dict[str, Any]:
    """``edit`` with the target of another edit of its relation (the same fact, changed)."""
    other = next(
        e
        for e in edits
        if e["relation"] == edit["relation"]
        and e["target"] not in (edit["target"], edit.get("target_true"))
    )
    return {**edit, "id": f"{edit['id']}-v{n}", "target": other["target"]}


def test_supersede_order_in_one_batch_and_who_may_supersede(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    """``[b supersedes a, a]`` in one request: ``a`` is applied first, then ``b`` replaces
    it. A spool edit may not replace an API edit, neither by naming it in ``supersedes``
    nor as the same fact the hook would merge: both fail with the reason and the API
    edit stays applied and answered."""
    daemon = make_daemon()
    a, b = dict(world_edits[0]), {**world_edits[1], "supersedes": world_edits[0]["id"]}
    daemon.submit([b, a])
    settle(daemon)
    assert daemon.get_edit(a["id"]).status.value == "superseded"
    assert daemon.get_edit(b["id"]).status.value == "applied"
    assert a["id"] not in _held(daemon) and b["id"] in _held(daemon)

    api = dict(world_edits[2])
    daemon.submit([api])
    settle(daemon)
    assert daemon.get_edit(api["id"]).backend == "hook"
    named = {**world_edits[3], "id": "spool-named", "supersedes": api["id"]}
    merged = _same_fact(world_edits, api, 2)  # no supersedes: the hook merges the fact
    queue = EditQueue(daemon.live_store())
    queue.submit_many([named, merged], source_kind=SourceKind.SPOOL)
    settle(daemon)
    for edit, why in ((named, "supersede"), (merged, "replaced an earlier edit (same fact)")):
        record = daemon.get_edit(edit["id"])
        assert record.status.value == "failed", record
        assert f"edit '{api['id']}' was made by the api" in (record.error or "")
        assert "the spool may supersede or retract only edits it made" in (record.error or "")
        assert why in (record.error or "")
        assert edit["id"] not in _held(daemon)
    assert daemon.get_edit(api["id"]).status.value == "applied"
    assert api["id"] in _held(daemon)
    assert _answer(daemon, api) == api["target"].split()[0]


def test_a_database_error_at_the_ack_is_undone_in_the_model(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    """The commit of a superseding edit fails (sqlite3.OperationalError): the edit leaves
    the model again, the edit it replaces comes back, and the edit goes back to the
    queue; the retry applies it (not "already applied") and then replaces the old one."""
    daemon = make_daemon(
        router={"backends": ["melo"]},
        worker={"lease_s": 3.0, "backoff_base_s": 0.1},
    )
    old = dict(world_edits[5])
    daemon.submit([old])
    settle(daemon)
    new = {**_same_fact(world_edits, old, 2), "supersedes": old["id"]}
    reports: list[BatchReport] = []
    worker = daemon.worker
    assert worker is not None and daemon.queue is not None
    after_batch = worker.hooks.after_batch
    worker.hooks.after_batch = lambda r: (reports.append(r), after_batch(r))  # type: ignore[func-returns-value]
    real_held, fired = daemon.queue._held, threading.Event()

    def held_once(*args: Any) -> Any:
        if not fired.is_set():
            fired.set()
            raise sqlite3.OperationalError("disk I/O error")
        return real_held(*args)

    daemon.queue._held = held_once
    daemon.submit([new])
    _wait(lambda: daemon.get_edit(new["id"]).status.value not in ("queued", "applying"), "new")
    record = daemon.get_edit(new["id"])
    assert fired.is_set()
    assert record.status.value == "applied" and record.attempts == 2, record
    assert reports[0].lost == [new["id"]] and reports[0].restored == [old["id"]]
    assert daemon.get_edit(old["id"]).status.value == "superseded"
    assert _held(daemon).count(new["id"]) == 1 and old["id"] not in _held(daemon)
    assert _answer(daemon, new) == new["target"].split()[0]
    kinds = [e.kind for e in editlog.events(daemon.live_store(), edit_id=old["id"])]
    assert kinds.count("edit_superseded") == 1 and "edit_failed" not in kinds


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # it dies
def test_the_worker_survives_database_errors_and_healthz_sees_a_stuck_or_dead_one(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    """A database error in the loop (outside a batch) is logged and retried; /healthz says
    503 while the worker makes no progress for longer than a lease, and once its thread
    has died; 200 otherwise."""
    daemon = make_daemon(router={"default_backend": "melo"}, worker={"lease_s": 2.0})
    store, worker = daemon.live_store(), daemon.worker
    assert worker is not None
    client = TestClient(create_app(daemon, daemon.config.api), base_url="http://127.0.0.1")
    real_read, failed = store.read, threading.Event()

    @contextmanager
    def flaky_read() -> Iterator[Any]:
        if threading.current_thread().name == "editd-worker" and not failed.is_set():
            failed.set()
            raise sqlite3.OperationalError("database disk image is malformed")
        with real_read() as db:
            yield db

    store.read = flaky_read
    assert failed.wait(10)
    first = dict(world_edits[0])
    daemon.submit([first])
    _wait(lambda: daemon.get_edit(first["id"]).status.value == "applied", "the first edit")
    assert worker.failures == 0 and client.get("/healthz").json() == {"status": "ok"}

    assert daemon.engine is not None
    real_apply, entered, release = daemon.engine.apply, threading.Event(), threading.Event()

    def stuck_apply(*args: Any) -> Any:
        entered.set()
        release.wait(30)
        return real_apply(*args)

    daemon.engine.apply = stuck_apply
    second = dict(world_edits[1])
    daemon.submit([second])
    assert entered.wait(10)
    health = _wait(lambda: (r := client.get("/healthz")).status_code == 503 and r, "stuck")
    assert health.json()["status"] == "unhealthy"
    assert "no progress" in health.json()["reason"]
    release.set()
    _wait(lambda: daemon.get_edit(second["id"]).status.value == "applied", "the second edit")
    assert client.get("/healthz").status_code == 200

    def die() -> None:
        raise SystemExit("simulated fatal error")

    worker.run_once = die
    daemon.submit([dict(world_edits[2])])
    assert daemon._worker_thread is not None
    _wait(lambda: not daemon._worker_thread.is_alive(), "the worker thread to end")
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json() == {"status": "unhealthy", "reason": "the worker thread has stopped"}


def test_start_up_refuses_a_damaged_store(micro_world: Path, tmp_path: Path) -> None:
    """``PRAGMA quick_check`` at start-up: a damaged store stops the daemon with
    StoreIntegrityError before anything else runs."""
    config = load_config(write_config(tmp_path, micro_world))
    path = config.store.path
    with Store.open(path) as st:
        EditQueue(st).submit_many(
            [{"prompt": f"The CEO of A{n} is " + "x" * 300, "target": " B"} for n in range(60)]
        )
        (page,) = st.db.execute(
            "SELECT MAX(pageno) FROM dbstat WHERE name = 'edits' AND pagetype = 'leaf'"
        ).fetchone()
        size = int(st.db.execute("PRAGMA page_size").fetchone()[0])
    data = bytearray(path.read_bytes())
    data[(page - 1) * size : page * size] = b"\xff" * size
    path.write_bytes(bytes(data))
    daemon = Daemon(config)
    with pytest.raises(StoreIntegrityError, match="integrity check failed"):
        daemon.start()
    assert daemon.engine is None and not daemon.is_ready()
