"""The client side the daemon load benchmarks share (``bench.load``,
``bench.completions_load``): a thread-safe recorder, a timed completion request, the
paced edit stream and the report of its edits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.stats import summary


class StreamRecorder:
    """Thread-safe record of a load run: client errors and the ids of the streamed edits
    (the benchmarks add their own lists under ``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.edit_ids: list[str] = []

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what[:300])


def post_completion(
    client: httpx.Client, url: str, body: dict[str, Any], rec: StreamRecorder
) -> tuple[float, float, httpx.Response] | None:
    """``POST {url}/v1/completions`` with ``body``: (perf_counter at the start, latency s,
    the answer), or None when no answer came (the exception goes to ``rec``'s errors)."""
    start = time.perf_counter()
    try:
        r = client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as exc:
        rec.error(f"completion: {type(exc).__name__}: {exc}")
        return None
    return start, time.perf_counter() - start, r


def edit_stream(
    url: str,
    edits: Sequence[dict[str, Any]],
    rate: float,
    t0: float,
    stop: threading.Event,
    rec: StreamRecorder,
) -> None:
    """Submit edit k of ``edits`` at ``t0 + k / rate`` (one ``POST /v1/edits`` each) until
    ``stop``; the accepted ids go to ``rec.edit_ids``, failures to its errors."""
    with httpx.Client(timeout=120) as client:
        for k, edit in enumerate(edits):
            if stop.wait(max(0.0, t0 + k / rate - time.perf_counter())):
                return
            try:
                r = client.post(f"{url}/v1/edits", json={"edits": [edit]})
            except httpx.HTTPError as exc:
                rec.error(f"edit: {type(exc).__name__}: {exc}")
                continue
            if r.status_code != 202:
                rec.error(f"edit: HTTP {r.status_code}: {r.text}")
                continue
            with rec.lock:
                rec.edit_ids += r.json()["ids"]


def edit_report(recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Submitted / applied / failed counts of settled records, and the applied ones'
    submit-to-applied latency."""
    applied = [r for r in recs.values() if r["status"] == "applied"]
    return {
        "submitted": len(recs),
        "applied": len(applied),
        "failed": sum(1 for r in recs.values() if r["status"] == "failed"),
        "latency_s": summary([r["applied_at"] - r["created_at"] for r in applied]),
    }
