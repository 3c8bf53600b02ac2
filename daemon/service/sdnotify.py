"""A small systemd notify client (``sd_notify(3)``), with no dependency.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a filesystem
path (``/run/systemd/notify``) or an abstract-namespace name starting with
``@``. Each notification is one ``AF_UNIX`` ``SOCK_DGRAM`` datagram of
newline-separated ``KEY=VALUE`` assignments. Without ``NOTIFY_SOCKET`` (tests,
a terminal, another supervisor) every call is a no-op.

Send errors are logged and never raised: a daemon must not die because
systemd or journald restarted. The first failure after a success logs a
warning; repeats log at debug level so a dead socket cannot flood the journal.

The watchdog: with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, the process meant to ping). ``watchdog_interval_s`` returns
half the period (the interval ``sd_watchdog_enabled(3)`` recommends) when the
watchdog is meant for this process, else None.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from contextlib import suppress

from daemon.log import get_logger

log = get_logger(__name__)


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``NOTIFY_SOCKET`` value, or None when unusable.

    ``@name`` is the abstract name ``\\0name``; an absolute path is used as is.
    Anything else (empty, relative, ``vsock:...``) is not supported.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def parse_watchdog_usec(environ: Mapping[str, str], pid: int | None = None) -> int | None:
    """The watchdog period in microseconds, or None when off or meant for another process.

    ``WATCHDOG_USEC`` must be a positive integer; ``WATCHDOG_PID``, when set,
    must equal ``pid`` (default: this process). Malformed values mean "off".
    """
    raw = environ.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            owner = int(raw_pid)
        except ValueError:
            return None
        if owner != (os.getpid() if pid is None else pid):
            return None
    return usec


class Notifier:
    """Sends notifications to systemd, or does nothing when not run under it.

    Build it with ``Notifier.from_env()``. The named methods return nothing;
    ``notify`` returns whether the datagram was sent (False for the no-op
    notifier and on send errors). Thread-safe.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("sd_notify_socket_unsupported", notify_socket=raw)
        return cls(address, watchdog_usec=parse_watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self._address is not None

    def ready(self) -> None:
        """Start-up finished (``READY=1``)."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """A one-line status shown by ``systemctl status`` (newlines become spaces)."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``)."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown began (``STOPPING=1``)."""
        self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the start/stop timeout fires."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self.notify(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def reloading(self) -> None:
        """A reload began: ``RELOADING=1`` and ``MONOTONIC_USEC`` (``Type=notify-reload``).

        Send ``ready()`` when the reload is done.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog period in seconds (how often to ping), or None when off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; log (never raise) on failure."""
        if self._address is None:
            return False
        message = "\n".join(assignments)
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(message.encode("utf-8"), self._address)
            except OSError as exc:
                self._close_locked()
                self._log_failure(message, exc)
                return False
            self._failing = False
            return True

    def close(self) -> None:
        """Close the socket (a later call opens a new one)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            with suppress(OSError):
                self._sock.close()
            self._sock = None

    def _log_failure(self, message: str, exc: OSError) -> None:
        first_line = message.split("\n", 1)[0]
        if self._failing:
            log.debug("sd_notify_failed", message=first_line, error=str(exc))
            return
        self._failing = True
        log.warning("sd_notify_failed", message=first_line, error=str(exc))
