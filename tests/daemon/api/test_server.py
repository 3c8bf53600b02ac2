"""Connection limits against a live server: idle sockets cannot exhaust it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx

from tests.daemon.api.conftest import ServerFactory, StoreFacade, wait_until
from tests.daemon.api.test_concurrency import GatedFacade


@contextmanager
def idle_sockets(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections to ``port`` that send nothing."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks.append(sock)
        yield socks


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closed ``sock`` (EOF or reset) within ``wait_s`` seconds."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_sockets_past_the_limit_make_room_and_healthz_answers(
    make_server: ServerFactory,
) -> None:
    """Three times ``max_connections`` idle sockets: each new one closes the oldest idle
    one, so at most the limit stay open, and /healthz answers at once."""
    server = make_server(max_connections=8, request_header_timeout_s=60)
    with idle_sockets(server.port, 24) as socks:
        health = httpx.get(server.url("/healthz"), timeout=5)
        assert health.status_code == 200
        assert health.elapsed.total_seconds() < 1.0
        closed = [closed_by_server(s, 0.5) for s in socks]
    assert sum(closed) >= 24 - 8 + 1  # the healthz connection took one place too
    assert not any(closed[-6:])  # the newest stay


def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout(
    make_server: ServerFactory, facade: StoreFacade
) -> None:
    """Silence, or half a request: closed after ``request_header_timeout_s``. A request
    whose headers arrived in time may take longer than that."""
    gated = GatedFacade(facade)
    server = make_server(gated, request_header_timeout_s=0.5)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.get, server.url("/v1/status"), timeout=30)
        with idle_sockets(server.port, 2) as (silent, partial):
            partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            assert closed_by_server(silent, 5)
            assert closed_by_server(partial, 5)
            assert 0.3 < time.monotonic() - t0 < 3
        wait_until(lambda: gated.inside == 1, what="the slow request")
        time.sleep(0.5)
        gated.gate.set()
        assert slow.result().status_code == 200


def test_requests_past_the_limit_get_503_when_every_connection_is_busy(
    make_server: ServerFactory, facade: StoreFacade
) -> None:
    """No idle connection to close: the next request is refused with 503, not queued."""
    gated = GatedFacade(facade)
    server = make_server(gated, max_connections=3)
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(httpx.get, server.url("/v1/status"), timeout=60) for _ in range(3)]
        try:
            wait_until(lambda: gated.inside == 3, what="three busy connections")
            refused = httpx.get(server.url("/healthz"), timeout=5)
            assert refused.status_code == 503
        finally:
            gated.gate.set()
        assert [f.result().status_code for f in busy] == [200, 200, 200]
    assert httpx.get(server.url("/healthz"), timeout=5).status_code == 200
