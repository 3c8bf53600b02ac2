"""Real processes on one store file: concurrent workers, and workers killed with SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from store import editlog
from store.db import Store
from store.queue import EditQueue
from tests.store.helpers import request

WORKER = Path(__file__).with_name("_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
END_OF_LEASE = {"edit_applied", "edit_requeued", "edit_released", "edit_failed", "lease_expired"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def fill(path: Path, n: int) -> list[str]:
    """Create a store holding ``n`` queued edits; return their ids."""
    with Store.open(path) as store:
        results = EditQueue(store).submit_many([request(i) for i in range(n)])
    return [r.id for r in results]


def spawn(
    path: Path, name: str, tmp: Path, *, lease_s: float, work_s: float
) -> subprocess.Popen[bytes]:
    """Start a worker process; it waits for ``tmp/go`` before claiming."""
    args = [str(path), name, str(tmp / f"{name}.ready"), str(tmp / "go"), str(tmp / f"{name}.out")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args, str(lease_s), "3", str(work_s)],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )


def wait_ready(tmp: Path, names: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait (at most 10 s) until every worker has opened the store."""
    deadline = time.monotonic() + 10
    while not all((tmp / f"{n}.ready").exists() for n in names):
        assert all(p.poll() is None for p in procs), "a worker died while starting"
        assert time.monotonic() < deadline, "workers did not start in time"
        time.sleep(0.01)


def finish(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Wait for workers to drain the queue; kill them if they overrun."""
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("a worker did not finish in time")
        assert proc.returncode == 0, err.decode(errors="replace")


def check_log(store: Store, ids: list[str]) -> None:
    """Every edit applied exactly once; no edit ever leased to two workers at once."""
    events = editlog.events(store, limit=1_000_000)
    applied = Counter(e.edit_id for e in events if e.kind == "edit_applied")
    assert set(applied) == set(ids) and set(applied.values()) == {1}
    holder: dict[str, tuple[str, float]] = {}  # edit id -> (worker, lease expiry)
    for event in events:
        assert event.edit_id is not None
        if event.kind == "edit_claimed":
            assert event.edit_id not in holder, f"{event.edit_id} claimed while leased"
            holder[event.edit_id] = (event.data["worker"], event.data["lease_expires"])
        elif event.kind in END_OF_LEASE and event.edit_id in holder:
            worker, expires = holder.pop(event.edit_id)
            if event.kind == "lease_expired":
                assert event.ts >= expires, "taken back before its lease ran out"
            else:
                assert event.data["worker"] == worker
    assert not holder
    counts = EditQueue(store).counts()
    assert counts["applied"] == len(ids) and EditQueue(store).depth() == 0


def test_two_workers_drain_the_queue_exactly_once(tmp_path: Path) -> None:
    """Two processes claim and ack concurrently: each edit applied once, leases never overlap."""
    path = tmp_path / "store.sqlite3"
    ids = fill(path, 300)
    names = ["w1", "w2"]
    procs = [spawn(path, n, tmp_path, lease_s=30, work_s=0.002) for n in names]
    wait_ready(tmp_path, names, procs)
    (tmp_path / "go").touch()
    finish(procs)
    outs = [(tmp_path / f"{n}.out").read_text().split() for n in names]
    assert all(outs), "both workers did some of the work"
    assert not set(outs[0]) & set(outs[1])
    assert sorted(outs[0] + outs[1]) == sorted(ids)
    with Store.open(path, create=False) as store:
        check_log(store, ids)
        assert store.integrity_check() == "ok"


def test_killed_workers_lose_nothing(tmp_path: Path) -> None:
    """SIGKILL mid claim/ack six times, then requeue and drain: nothing lost or applied twice."""
    path = tmp_path / "store.sqlite3"
    ids = fill(path, 800)
    rng = random.Random(1234)
    (tmp_path / "go").touch()
    with Store.open(path, create=False) as store:
        queue = EditQueue(store)
        for round_ in range(6):
            name = f"k{round_}"
            proc = spawn(path, name, tmp_path, lease_s=0.3, work_s=0.004)
            wait_ready(tmp_path, [name], [proc])
            time.sleep(rng.uniform(0.05, 0.3))
            assert queue.depth() > 0, "the queue drained before the kill"
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            assert proc.returncode == -signal.SIGKILL
        time.sleep(0.35)  # every lease of a killed worker has now expired
        queue.requeue_expired()
        assert queue.counts()["applying"] == 0
    drain = spawn(path, "drain", tmp_path, lease_s=5, work_s=0)
    finish([drain])
    with Store.open(path, create=False) as store:
        check_log(store, ids)
        assert store.integrity_check() == "ok"
        assert editlog.events(store, kind="lease_expired"), "some kills left leases behind"
