"""The nightly run on a real store with a fake daemon: release, import, wait, drift, summary."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import daemon.service.nightly as nightly_mod
from daemon.config import Config, FeedsConfig
from daemon.errors import DriftDisabledError
from daemon.service.nightly import NightlySummary, import_offline, run_nightly
from store.db import Store
from store.queue import EditQueue, QueuePolicy
from store.spool import NightlyRunStatus, get_nightly_run, latest_nightly_run, list_spool_files


class FakeHost:
    """The daemon as a nightly run sees it: a store, a queue, a drift check, a stop flag."""

    def __init__(self, store: Store, config: Config) -> None:
        self.config = config
        self.store = store
        self.queue = EditQueue(store, QueuePolicy(max_attempts=1))
        self.drift: Callable[[], dict[str, Any]] = lambda: {"passed": True, "rollback": None}
        self.drift_calls = 0
        self.stop = threading.Event()

    def live_store(self) -> Store:
        return self.store

    def live_queue(self) -> EditQueue:
        return self.queue

    def run_drift_check(self) -> dict[str, Any]:
        self.drift_calls += 1
        return self.drift()

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()


class FakeWorker:
    """Claims due edits through the real queue and acks them (fails those saying FAIL)."""

    def __init__(self, store: Store) -> None:
        self.queue = EditQueue(store, QueuePolicy(max_attempts=1))
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.is_set():
            claimed = self.queue.claim(8, 30.0, "fake-worker")
            for record in claimed:
                assert record.request is not None
                if "FAIL" in record.request.prompt:
                    self.queue.fail(record.id, "fake-worker", "verification failed", retry=False)
                else:
                    self.queue.ack(record.id, "fake-worker", backend="melo")
            if not claimed:
                self.done.wait(0.01)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    return dataclasses.replace(Config(), feeds=FeedsConfig(spool_dir=spool))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "var" / "editd.sqlite3") as st:
        yield st


@pytest.fixture
def host(db: Store, config: Config) -> FakeHost:
    return FakeHost(db, config)


@pytest.fixture
def worker(db: Store) -> Iterator[FakeWorker]:
    w = FakeWorker(db)
    w.thread.start()
    yield w
    w.done.set()
    w.thread.join()


def edit(n: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": f"The mayor of Vell{n} is", "target": f" Orla{n}", **extra}


def drop(config: Config, name: str, lines: list[Any]) -> None:
    incoming = config.feeds.spool_dir / "incoming"
    body = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    (incoming / f".{name}.tmp").write_text(body)
    (incoming / f".{name}.tmp").rename(incoming / name)


def stored(db: Store, summary: NightlySummary) -> dict[str, Any]:
    run = get_nightly_run(db, summary.run_id)
    assert run.status is summary.status and run.finished_at is not None
    assert run.summary == json.loads(json.dumps(summary.to_json_dict()))
    return run.summary


def edit_count(db: Store) -> int:
    with db.read() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM edits").fetchone()[0])


def test_nightly_run_releases_imports_waits_and_validates(
    db: Store, host: FakeHost, config: Config, worker: FakeWorker
) -> None:
    """Held edits wait for the run; the run imports the spool, releases them, waits until
    the worker applied everything, validates drift and stores its summary."""
    held = host.queue.submit_many([edit(1, schedule="nightly"), edit(2, schedule="nightly")])
    now = host.queue.submit(edit(3))
    drop(config, "a.jsonl", [edit(10), edit(11), "oops", edit(12, schedule="nightly")])
    while host.queue.get(now.id).status != "applied":
        worker.done.wait(0.01)
    assert [host.queue.get(r.id).status for r in held] == ["queued", "queued"]
    with capture_logs() as logs:
        summary = run_nightly(host, trigger="test", wait_s=30, poll_s=0.01)
    assert summary.status is NightlyRunStatus.DONE and summary.released == 3
    data = stored(db, summary)
    assert (data["accepted"], data["rejected"], data["duplicates"]) == (3, 1, 0)
    assert (data["waited_for"], data["applied"], data["failed"], data["pending"]) == (5, 5, 0, 0)
    assert data["wait"]["outcome"] == "done" and data["drift"]["status"] == "passed"
    assert data["files"][0]["name"] == "a.jsonl" and data["files"][0]["rejected"] == 1
    assert set(data["durations_s"]) == {"import", "release", "wait", "drift", "total"}
    assert host.drift_calls == 1
    assert all(host.queue.get(r.id).status == "applied" for r in held)
    assert list_spool_files(db)[0].run_id == summary.run_id
    finished = [e for e in logs if e["event"] == "nightly_run_finished"]
    assert finished and finished[0]["applied"] == 5 and finished[0]["drift"] == "passed"


def test_failed_edits_are_counted(
    db: Store, host: FakeHost, config: Config, worker: FakeWorker
) -> None:
    """An edit the worker fails for good counts as failed, not pending."""
    drop(config, "a.jsonl", [edit(1), {"prompt": "FAIL this one", "target": " x"}])
    summary = run_nightly(host, trigger="test", wait_s=30, poll_s=0.01)
    assert (summary.edits["applied"], summary.edits["failed"], summary.edits["pending"]) == (
        1,
        1,
        0,
    )


def test_wait_times_out_and_counts_pending(db: Store, host: FakeHost, config: Config) -> None:
    """Nobody applies the edits: the wait ends at wait_s, the rest is pending, drift still runs."""
    host.queue.submit_many([edit(1, schedule="nightly")])
    drop(config, "a.jsonl", [edit(2), edit(3)])
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    summary = run_nightly(
        host, trigger="test", wait_s=5.0, poll_s=1.0, clock=lambda: now[0], sleep=sleep
    )
    assert summary.wait["outcome"] == "timed_out" and sum(sleeps) == pytest.approx(5.0)
    assert summary.edits == {"waited_for": 3, "applied": 0, "failed": 0, "pending": 3, "other": 0}
    assert stored(db, summary)["pending"] == 3 and host.drift_calls == 1


def test_the_default_wait_comes_from_the_config(db: Store, config: Config) -> None:
    """Without wait_s, [scheduler] nightly_wait_s bounds the wait."""
    cfg = dataclasses.replace(
        config, scheduler=dataclasses.replace(config.scheduler, nightly_wait_s=2)
    )
    host = FakeHost(db, cfg)
    host.queue.submit(edit(1, schedule="nightly"))
    now = [0.0]
    summary = run_nightly(
        host, trigger="t", clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    assert summary.wait == {"outcome": "timed_out", "timeout_s": 2} and now[0] == 2


def test_a_stopping_daemon_ends_the_wait_and_skips_drift(db: Store, host: FakeHost) -> None:
    """Shutdown does not wait hours for the nightly run."""
    host.queue.submit(edit(1, schedule="nightly"))
    host.stop.set()
    summary = run_nightly(host, trigger="test", wait_s=3600, poll_s=0.01)
    assert summary.wait["outcome"] == "stopped" and summary.edits["pending"] == 1
    assert summary.drift == {"status": "skipped", "reason": "daemon stopping"}
    assert host.drift_calls == 0 and summary.status is NightlyRunStatus.DONE


@pytest.mark.parametrize(
    ("drift", "status"),
    [
        ({"passed": False, "rollback": {"quarantined": 2}}, "rolled_back"),
        ({"passed": False, "rollback": None}, "failed"),
        ({}, "skipped"),
    ],
)
def test_drift_outcomes(db: Store, host: FakeHost, drift: dict[str, Any], status: str) -> None:
    """The drift report decides the drift status and is kept in the summary."""
    host.drift = lambda: drift
    summary = run_nightly(host, trigger="test", wait_s=1, poll_s=0.01)
    assert summary.drift["status"] == status and summary.wait["outcome"] == "nothing"
    assert stored(db, summary)["drift"].get("report", {}) == drift


def test_a_drift_error_is_recorded_not_raised(db: Store, host: FakeHost) -> None:
    """A failing drift check is recorded in the summary; the run is still done."""

    def boom() -> dict[str, Any]:
        raise RuntimeError("probe set unreadable")

    host.drift = boom
    with capture_logs() as logs:
        summary = run_nightly(host, trigger="test", wait_s=1, poll_s=0.01)
    assert summary.status is NightlyRunStatus.DONE
    assert stored(db, summary)["drift"] == {
        "status": "error",
        "error": "RuntimeError: probe set unreadable",
    }
    assert any(e["event"] == "nightly_drift_failed" for e in logs)

    def disabled() -> dict[str, Any]:
        raise DriftDisabledError("drift validation is disabled")

    host.drift = disabled
    assert run_nightly(host, trigger="test", wait_s=1).drift["status"] == "disabled"


def test_a_crashing_run_is_recorded_as_failed(
    db: Store, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's own crash marks the row failed with the error, and propagates."""
    host.queue.submit(edit(1, schedule="nightly"))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("spool folder unreadable")

    monkeypatch.setattr(nightly_mod, "import_spool", broken)
    with pytest.raises(OSError, match="unreadable"):
        run_nightly(host, trigger="test", wait_s=1)
    run = latest_nightly_run(db)
    assert run is not None and run.status is NightlyRunStatus.FAILED
    assert run.summary["error"] == "OSError: spool folder unreadable"
    assert run.summary["released"] == 0 and host.drift_calls == 0


def test_import_offline_defers_drift(db: Store, config: Config) -> None:
    """Without a daemon: import and release, no wait, drift deferred, edits pending."""
    queue = EditQueue(db)
    queue.submit(edit(1, schedule="nightly"))
    drop(config, "a.jsonl", [edit(2)])
    summary = import_offline(db, config, trigger="cli")
    assert summary.released == 1 and summary.edits["pending"] == 2
    assert summary.drift == {"status": "deferred", "reason": "no daemon running"}
    assert stored(db, summary)["accepted"] == 1
    assert {r.schedule for r in queue.list()} == {"now"}


@pytest.mark.parametrize("other", ["scheduler", "offline"])
def test_concurrent_runs_import_each_file_once(
    db: Store, host: FakeHost, config: Config, worker: FakeWorker, other: str
) -> None:
    """Two runs at once (two in the daemon, or one in the daemon and one offline on
    another connection): each file and line is imported once, and both runs finish."""
    names = [f"f{f}.jsonl" for f in range(6)]
    for f, name in enumerate(names):
        drop(config, name, [edit(f * 100 + i) for i in range(30)])
    summaries: list[NightlySummary] = []

    def online() -> None:
        summaries.append(run_nightly(host, trigger="scheduler", wait_s=30, poll_s=0.01))

    def offline() -> None:
        with Store.open(db.path) as other:
            summaries.append(import_offline(other, config, trigger="cli"))

    threads = [
        threading.Thread(target=f) for f in (online, online if other == "scheduler" else offline)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(summaries) == 2 and {s.status for s in summaries} == {NightlyRunStatus.DONE}
    assert edit_count(db) == 180 and len(list_spool_files(db)) == 6
    fresh = [f.name for s in summaries if s.spool for f in s.spool.files if not f.resumed]
    assert sorted(fresh) == names
    assert sum(s.to_json_dict()["accepted"] for s in summaries) == 180
    assert sorted(p.name for p in (config.feeds.spool_dir / "processed").glob("*.jsonl")) == names
