"""The systemd notify client against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.service.sdnotify import Notifier, parse_watchdog_usec, socket_address


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a file in tmp_path, and its path."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode("utf-8"))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2.0)


def test_messages_arrive_on_a_filesystem_socket(receiver: tuple[socket.socket, str]) -> None:
    """Each call sends exactly one datagram with the documented assignments."""
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    notifier.status("applying batch\n3 of 5")
    notifier.watchdog()
    notifier.extend_timeout(1.5)
    notifier.stopping()
    notifier.close()
    assert _drain(sock) == [
        "READY=1",
        "STATUS=applying batch 3 of 5",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=1500000",
        "STOPPING=1",
    ]


def test_reloading_carries_a_monotonic_timestamp(receiver: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC taken from CLOCK_MONOTONIC, in one datagram."""
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_env({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (message,) = _drain(sock)
    first, second = message.split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_socket() -> None:
    """``@name`` addresses the abstract socket ``\\0name``."""
    name = f"editd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_notify_socket_means_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    with capture_logs() as logs:
        notifier.ready()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.extend_timeout(3)
        notifier.reloading()
        assert not notifier.notify("READY=1")
    assert logs == []
    assert notifier.watchdog_interval_s() is None


def test_unsupported_socket_value_is_a_logged_no_op() -> None:
    """A relative path or a vsock address disables the notifier with a warning."""
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["sd_notify_socket_unsupported"]


def test_socket_address() -> None:
    """Paths pass through, ``@`` becomes a NUL, anything else is refused."""
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == "\0abc"
    assert socket_address("@") is None
    assert socket_address("relative/path") is None


def test_send_errors_are_logged_not_raised(tmp_path: Path) -> None:
    """A missing socket (systemd gone) logs one warning, then debug events; never raises."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        notifier.ready()
        assert not notifier.notify("WATCHDOG=1")
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("sd_notify_failed", "warning"),
        ("sd_notify_failed", "debug"),
    ]
    assert logs[0]["message"] == "READY=1"


def test_recovers_after_the_socket_comes_back(tmp_path: Path) -> None:
    """After a failure the next call opens a new socket and succeeds."""
    path = tmp_path / "later.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs():
        assert not notifier.notify("WATCHDOG=1")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert notifier.notify("WATCHDOG=1")
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_extend_timeout_rejects_negative_seconds() -> None:
    """A negative extension is a programming error, raised even when disabled."""
    with pytest.raises(ValueError, match="seconds"):
        Notifier.from_env({}).extend_timeout(-1)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_parse_watchdog_usec(env: dict[str, str], expected: int | None) -> None:
    """WATCHDOG_USEC counts only when positive and meant for this process."""
    assert parse_watchdog_usec(env) == expected


def test_watchdog_interval_is_half_the_period() -> None:
    """systemd recommends pinging at half of WatchdogSec."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s() == pytest.approx(10.0)
    other = Notifier.from_env({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s() is None
