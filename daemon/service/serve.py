"""``editd serve``: the daemon process (HTTP API, signals, systemd notifications).

The store's lock is taken first (a second daemon on the same store exits at
once, naming the pid that holds it); then the HTTP socket is bound (a busy port
or an unsafe address fails at once, and ``/healthz`` answers 503 while the model
loads); then the daemon starts (model, editors, restore, worker, scheduler) and
systemd is told READY=1. The main thread only waits for signals:

- SIGTERM / SIGINT: stop taking work, let the worker finish its batch, write a
  checkpoint, stop the API, exit 0. A second one exits at once (status 1): the
  queue's leases and the store's transactions make that safe, the next start
  takes back the batch in flight. During start-up (a first start may spend
  minutes on locate and key statistics) the first one abandons the start at
  once: nothing is half-written (caches are written atomically), exit 0.
- SIGHUP: re-read the config file and take its reloadable parts, the API token
  among them (the front end's reloadable settings): a rotated token applies to the
  next request.

The HTTP front end comes from the caller (``editd serve`` passes
:class:`daemon.api.server.ApiServer`), so the service does not know the API.

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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Protocol

import structlog

from daemon.config import ApiConfig, Config, load_config
from daemon.errors import ConfigError, Shutdown
from daemon.files import write_private_text
from daemon.service.daemon import Daemon
from daemon.service.sdnotify import Notifier

log = structlog.get_logger()

LOAD_TIMEOUT_EXTENSION_S = 600.0
EXIT_NOW = 1


class HttpFrontend(Protocol):
    """The HTTP side of the process: serves the daemon on a bound socket."""

    def run(self, sockets: list[socket.socket]) -> None:
        """Serve until :meth:`stop` (blocks; run in a thread)."""
        ...

    def stop(self) -> None:
        """Finish the requests under way and return from :meth:`run`."""
        ...

    def reload(self, fresh: ApiConfig) -> None:
        """Take the reloadable settings of ``fresh``."""
        ...


FrontendFactory = Callable[[Daemon, ApiConfig], HttpFrontend]
"""Builds the front end for a daemon (``ApiServer(daemon, config.api)``)."""


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
    check_api_bind(config.api)


def check_api_bind(api: ApiConfig) -> None:
    """Refuse a non-loopback address without an API token."""
    if not is_loopback(api.host) and not api.token:
        raise ConfigError(
            f"api.host = '{api.host}' is not a loopback address and no API token is "
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
        self.starting = False  # while set, a stop request unwinds the start-up at once

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            os._exit(EXIT_NOW)
        log.info("stop_requested", signal=signal.Signals(signum).name, starting=self.starting)
        self.stop.set()
        if self.starting:  # the model build (locate, statistics) may take minutes
            self.starting = False
            raise Shutdown("stop requested during start-up")

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


def run_server(config: Config, *, frontend: FrontendFactory, port_file: Path | None = None) -> int:
    """Run the daemon until a signal; the process exit status."""
    check_bind(config)
    signals = _Signals()
    signals.starting = True  # from here until ready, SIGTERM raises Shutdown
    signals.install()
    notifier = Notifier.from_env()
    daemon = Daemon(config)
    server: HttpFrontend | None = None
    http: threading.Thread | None = None
    t0 = time.perf_counter()

    def stop_http() -> None:
        # a SIGTERM may land between creating the thread and starting it: nothing runs yet
        if server is not None and http is not None and http.ident is not None:
            server.stop()
            http.join(timeout=10)

    try:
        daemon.claim_store()  # before the port, the store and the checkpoints
        sock = bind_socket(config.api.host, config.api.port)
        port = sock.getsockname()[1]
        if port_file is not None:
            write_private_text(port_file, f"{port}\n")
        server = frontend(daemon, config.api)
        http = threading.Thread(target=server.run, args=([sock],), name="editd-http")
        http.start()
        log.info("api_listening", host=config.api.host, port=port)
        notifier.extend_timeout(LOAD_TIMEOUT_EXTENSION_S)
        daemon.start(progress=lambda what: notifier.status(what))
        signals.starting = False
    except Shutdown:  # SIGTERM while starting: release what was taken (stop runs once)
        signals.starting = False
        log.info("startup_abandoned", startup_s=round(time.perf_counter() - t0, 2))
        daemon.stop(checkpoint=False)
        stop_http()
        notifier.close()
        return 0
    except BaseException:
        signals.starting = False
        stop_http()
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
            _reload(daemon, server, notifier, config.source)
    notifier.stopping()
    notifier.status("stopping: finishing the current batch")
    daemon.stop(checkpoint=True)
    done.set()
    server.stop()
    http.join(timeout=30)
    notifier.close()
    return 0


def _reload(daemon: Daemon, server: HttpFrontend, notifier: Notifier, source: Path | None) -> None:
    """Take the reloadable parts of the config file: the daemon's, then the API's (a
    public bind keeps refusing an empty token; the bind address itself stays)."""
    notifier.reloading()
    try:
        fresh = load_config(source)
        check_api_bind(replace(fresh.api, host=daemon.config.api.host))
        daemon.reload(replace(fresh, api=daemon.config.api))
        server.reload(fresh.api)
    except ConfigError as exc:
        log.error("reload_failed", error=str(exc))
    notifier.ready()
