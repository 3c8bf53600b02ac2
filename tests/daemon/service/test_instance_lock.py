"""The store's lock: one holder at a time across processes, naming the holder's pid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import StoreInUseError, UnsafePathError
from daemon.service.instance_lock import StoreLock, lock_path

HOLD = """
import sys
from pathlib import Path
from daemon.service.instance_lock import StoreLock
with StoreLock.acquire(Path(sys.argv[1]), role="test holder"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def hold_in_another_process(store_path: Path) -> subprocess.Popen[str]:
    """A real second process holding the lock of ``store_path`` until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # structlog's default output comes first
        if line.strip() == "held":
            return proc
    raise AssertionError(f"the holder exited {proc.wait(timeout=30)} without the lock")


def test_a_second_process_is_refused_with_the_holders_pid(store_path: Path) -> None:
    holder = hold_in_another_process(store_path)
    try:
        with pytest.raises(StoreInUseError) as info:
            StoreLock.acquire(store_path, role="second")
        assert info.value.pid == holder.pid
        assert info.value.role == "test holder"
        assert f"pid {holder.pid}" in str(info.value)
        assert str(store_path) in str(info.value)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    with StoreLock.acquire(store_path, role="after") as lock:  # the holder's exit freed it
        assert lock.held
    assert not lock.held


def test_the_lock_goes_with_a_killed_holder(store_path: Path) -> None:
    holder = hold_in_another_process(store_path)
    holder.kill()
    holder.wait(timeout=30)
    StoreLock.acquire(store_path, role="next").release()  # no stale lock after SIGKILL


def test_the_lock_file_is_private_and_beside_the_store(store_path: Path) -> None:
    with StoreLock.acquire(store_path, role="t") as lock:
        assert lock.path == lock_path(store_path.resolve())
        assert lock.path.name == "editd.sqlite3.lock"
        assert lock.path.stat().st_mode & 0o777 == 0o600
        assert store_path.parent.stat().st_mode & 0o777 == 0o700
        assert not store_path.exists()  # the lock never creates or opens the store


def test_a_symlink_planted_at_the_lock_is_refused(store_path: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    store_path.parent.mkdir(parents=True)
    lock_path(store_path).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        StoreLock.acquire(store_path, role="t")
    assert victim.read_text() == "keep"
