"""The HTTP server: the API app under uvicorn (h11) with connection limits.

:class:`ApiServer` is the front end ``editd serve`` runs beside the daemon
(:func:`daemon.service.serve.run_server` takes it as its ``frontend``).

uvicorn bounds requests in flight (``limit_concurrency``: more get its plain 503)
and idle keep-alive connections (``timeout_keep_alive``), but not the connections
themselves, nor the time a client may take before its first request: a thousand
sockets that never send a byte would each hold a file descriptor for good.
:class:`LimitedH11Protocol` adds both:

- request headers must be complete within ``[api] request_header_timeout_s`` of
  the connection (or of the previous response), else the connection is closed;
- at most ``[api] max_connections`` connections stay open: a new one closes the
  oldest idle one (no request in progress), so a crowd of idle sockets cannot lock
  out ``/healthz``. When every connection is busy, the new one's request gets 503.

It relies on the h11 protocol class of the pinned uvicorn (``cycle``,
``connections``, ``on_response_complete``); ``tests/daemon/api/test_server.py``
checks the behaviour against a live server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, ClassVar

import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.api.app import create_app, reload_settings
from daemon.api.facade import DaemonFacade
from daemon.config import ApiConfig

log = structlog.get_logger()


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout and a connection cap (class
    attributes, set per server by :func:`http_server`)."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def idle(self) -> bool:
        """No request in progress (none yet, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self.idle_since = time.monotonic()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.idle() and not self.transport.is_closing():
            log.debug("http_connection_timed_out", client=self.client)
            self._close()

    def _make_room(self) -> None:
        """Close the oldest idle connections while more than ``max_connections`` are open."""
        excess = len(self.connections) - self.max_connections
        if excess <= 0:
            return
        idle = sorted(
            (
                c
                for c in self.connections
                if c is not self and isinstance(c, LimitedH11Protocol) and c.idle()
            ),
            key=lambda c: c.idle_since,
        )
        for victim in idle[:excess]:
            log.debug("http_connection_evicted", client=victim.client)
            victim._close()

    def _close(self) -> None:
        self._disarm()
        self.connections.discard(self)  # counted as gone at once (connection_lost comes later)
        self.transport.close()


def http_server(app: ASGIApp, settings: ApiConfig) -> uvicorn.Server:
    """A uvicorn server for ``app`` under the connection limits in ``settings``."""
    protocol = type(
        "LimitedH11Protocol",
        (LimitedH11Protocol,),
        {
            "header_timeout_s": settings.request_header_timeout_s,
            "max_connections": settings.max_connections,
        },
    )
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        log_config=None,
        access_log=False,
        lifespan="off",
        workers=1,
        limit_concurrency=settings.max_connections + 1,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    return uvicorn.Server(config)


class ApiServer:
    """The API over ``facade``, served by uvicorn under ``settings``' connection limits."""

    def __init__(self, facade: DaemonFacade, settings: ApiConfig) -> None:
        self.app = create_app(facade, settings)
        self._server = http_server(self.app, settings)

    def run(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` until :meth:`stop` (blocks; run it in a thread)."""
        self._server.run(sockets=sockets)

    def stop(self) -> None:
        """Ask the server to finish the requests under way and return from :meth:`run`."""
        self._server.should_exit = True

    def reload(self, fresh: ApiConfig) -> None:
        """Take the reloadable API settings of ``fresh`` (SIGHUP)."""
        reload_settings(self.app, fresh)
