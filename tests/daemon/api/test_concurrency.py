"""Completions cannot starve the daemon: a cap with 429, and a /healthz that never queues.

The facade's slow calls are held at a gate (a stand-in for a long generation or a
busy store), so the tests know exactly how many requests are inside.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from daemon.engine.completions import CompletionChoice, CompletionRequest
from tests.daemon.api.conftest import (
    ServerFactory,
    StoreFacade,
    WorldModel,
    assert_error,
    wait_until,
)

THREAD_POOL = 40
"""Threads of the HTTP server's pool (anyio's default limiter)."""

BODY = {"prompt": "The capital of Vonmark is", "max_tokens": 2, "temperature": 0}


class GatedFacade(StoreFacade):
    """A real facade whose ``complete`` and ``status`` wait at ``gate`` first."""

    def __init__(self, base: StoreFacade) -> None:
        super().__init__(base.store, base.world)
        self.gate = threading.Event()
        self.inside = 0
        self._count = threading.Lock()

    def _wait(self) -> None:
        with self._count:
            self.inside += 1
        self.gate.wait(timeout=60)

    def complete(self, request: CompletionRequest) -> list[CompletionChoice]:
        self._wait()
        return super().complete(request)

    def status(self) -> dict[str, Any]:
        self._wait()
        return super().status()


def test_completions_past_the_cap_get_429_with_retry_after(
    make_server: ServerFactory, facade: StoreFacade, world_model: WorldModel
) -> None:
    """Two run (``max_concurrent_completions = 2``); the third is refused at once instead
    of queueing for the model; once they finish, slots are free again."""
    gated = GatedFacade(facade)
    server = make_server(gated, max_concurrent_completions=2)
    url = server.url("/v1/completions")
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(httpx.post, url, json=BODY, timeout=60) for _ in range(2)]
        wait_until(lambda: gated.inside == 2, what="two completions to start")
        refused = httpx.post(url, json=BODY, timeout=5)
        error = assert_error(refused, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert refused.headers["retry-after"] == "1"
        assert gated.inside == 2
        gated.gate.set()
        assert [f.result().status_code for f in running] == [200, 200]
    again = httpx.post(url, json=BODY, timeout=30)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"]


def test_healthz_answers_while_the_thread_pool_is_full(
    make_server: ServerFactory, facade: StoreFacade
) -> None:
    """Every pool thread is stuck in a facade call (and more requests wait for one);
    /healthz still answers at once, because it never needs a thread."""
    gated = GatedFacade(facade)
    server = make_server(gated)
    with ThreadPoolExecutor(THREAD_POOL + 5) as pool:
        stuck = [
            pool.submit(httpx.get, server.url("/v1/status"), timeout=60)
            for _ in range(THREAD_POOL + 5)
        ]
        wait_until(lambda: gated.inside == THREAD_POOL, what="the thread pool to fill")
        try:
            health = httpx.get(server.url("/healthz"), timeout=5)
            assert health.status_code == 200
            assert health.elapsed.total_seconds() < 1.0
            assert gated.inside == THREAD_POOL  # the pool was full the whole time
        finally:
            gated.gate.set()
        assert {f.result().status_code for f in stuck} == {200}
