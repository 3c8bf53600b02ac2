"""``editd serve``: the daemon process (HTTP API, signals, systemd notifications).

The HTTP socket is bound first (a busy port or an unsafe address fails at
once, and ``/healthz`` answers 503 while the model loads); then the daemon
starts (model, editors, restore, worker, scheduler) and systemd is told
READY=1. The main thread only waits for signals:

- SIGTERM / SIGINT: stop taking work, let the worker finish its batch, write a
  checkpoint, stop the API, exit 0. A second one exits at once (status 1): the
  queue's leases and the store's transactions make that safe, the next start
  takes back the batch in flight.
- SIGHUP: re-read the config file and take its reloadable parts.

With ``NOTIFY_SOCKET`` set, systemd hears READY/STATUS/STOPPING/RELOADING,
EXTEND_TIMEOUT while the model loads, and WATCHDOG pings while the worker makes
progress (a worker stuck longer than the lease stops the pings).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import structlog
import uvicorn

from daemon.config import Config, load_config
from daemon.errors import ConfigError
from daemon.sdnotify import Notifier
from daemon.service import Daemon

log = structlog.get_logger()

LOAD_TIMEOUT_EXTENSION_S = 600.0
EXIT_NOW = 1


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: Config) -> None:
    """Refuse a non-loopback address without an API token."""
    if not is_loopback(config.api.host) and not config.api.token:
        raise ConfigError(
            f"api.host = '{config.api.host}' is not a loopback address and no API token is "
            "set: set [api] token or EDITD_API_TOKEN, or bind 127.0.0.1",
            key="api.host",
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (clear error when the address is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror}", key="api.port") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Signals:
    """First SIGTERM/SIGINT asks to stop; a second exits at once; SIGHUP asks to reload."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            os._exit(EXIT_NOW)
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self.stop.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload.set()


def _watchdog(daemon: Daemon, notifier: Notifier, interval: float, done: threading.Event) -> None:
    limit = daemon.config.worker.lease_s
    while not done.wait(interval):
        age = daemon.worker_progress_age()
        if age <= limit:
            notifier.watchdog()
        else:
            log.warning("watchdog_withheld", worker_stalled_s=round(age, 1))


def run_server(config: Config, *, port_file: Path | None = None) -> int:
    """Run the daemon until a signal; the process exit status."""
    check_bind(config)
    signals = _Signals()
    signals.install()
    notifier = Notifier.from_env()
    sock = bind_socket(config.api.host, config.api.port)
    port = sock.getsockname()[1]
    if port_file is not None:
        port_file.write_text(f"{port}\n", encoding="utf-8")
    daemon = Daemon(config)
    from daemon.api.app import create_app

    app = create_app(daemon, config.api)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", workers=1)
    )
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="editd-http")
    http.start()
    log.info("api_listening", host=config.api.host, port=port)
    notifier.extend_timeout(LOAD_TIMEOUT_EXTENSION_S)
    t0 = time.perf_counter()
    try:
        daemon.start(progress=lambda what: notifier.status(what))
    except BaseException:
        server.should_exit = True
        http.join(timeout=10)
        raise
    notifier.ready()
    notifier.status(f"ready on {config.api.host}:{port}")
    log.info("serving", port=port, startup_s=round(time.perf_counter() - t0, 2))
    done = threading.Event()
    interval = notifier.watchdog_interval_s()
    if interval is not None:
        threading.Thread(
            target=_watchdog, args=(daemon, notifier, interval, done), daemon=True
        ).start()
    while not signals.stop.wait(0.2):
        if signals.reload.is_set():
            signals.reload.clear()
            _reload(daemon, notifier, config.source)
    notifier.stopping()
    notifier.status("stopping: finishing the current batch")
    daemon.stop(checkpoint=True)
    done.set()
    server.should_exit = True
    http.join(timeout=30)
    notifier.close()
    return 0


def _reload(daemon: Daemon, notifier: Notifier, source: Path | None) -> None:
    notifier.reloading()
    try:
        fresh = load_config(source)
        daemon.reload(replace(fresh, api=daemon.config.api))
    except ConfigError as exc:
        log.error("reload_failed", error=str(exc))
    notifier.ready()
