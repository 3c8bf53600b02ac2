"""A bounded load test of ``editd serve``: completion clients plus a steady edit stream.

A fresh daemon (subprocess, 127.0.0.1, one torch thread, drift off, ``--backends``
as in ``bench.throughput``) first applies ``--preload`` edits; then, for
``--duration-s`` seconds, ``--clients`` threads (each its own ``httpx.Client``) send
``POST /v1/completions`` back to back (one prompt, greedy, ``max_tokens`` 8, drawn
seeded from the edit set's prompts and locality prompts) while one more thread submits
the next edit of the set every ``1 / --edit-rate`` seconds through ``POST /v1/edits``.
A sampler reads the daemon's VmRSS from ``/proc/<pid>/status`` and the applied count
from ``GET /v1/status`` every second.

Reported: errors (any non-2xx answer or exception; must be zero), completion latency
p50/p95/p99, requests/s and generated tokens/s, the streamed edits' submit-to-applied
latency, and RSS over time: when ready, after the preload (which includes one-time
set-up such as the first apply's allocations), and in the window (start, end, max,
growth, and the least-squares slope of RSS against the applied count), also for its
steady part after ``--settle-s`` seconds (the first seconds of concurrent requests
allocate their buffers). After the window the streamed edits are drained and a
checkpoint is written: its size per applied edit is the edit state, the yardstick for
the slope ("no memory growth beyond the edit state"). ``--edit-rate 0`` runs the
completions alone, the control for the memory figures. RSS counts memory the allocator
keeps after ``free`` too: compare slopes over several runs, not single samples.

    .venv/bin/python -m bench.load --duration-s 180 --preload 100

Writes ``bench/results/load-<model>-<backends>[-<tag>].json`` (with the RSS time
series); prints a markdown table. The machine is shared (2 cores): latencies are noisy.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.daemon_cli import base_parser, run_main
from bench.daemon_process import (
    JSON,
    DaemonProcess,
    backend_setup,
    bench_sections,
    folder_bytes,
    load_edits,
    rss_kb,
    write_config,
)
from bench.load_clients import StreamRecorder, edit_report, edit_stream, post_completion
from bench.stats import markdown_table, summary

MAX_ERROR_SAMPLES = 20
EDIT_COUNTS = ("submitted", "applied", "failed")
MB_KEYS = ("start_mb", "end_mb", "max_mb")
PRE_KEYS = ("ready_mb", "after_preload_mb")


class Recorder(StreamRecorder):
    """Thread-safe lists of completion results, errors and submitted edits."""

    def __init__(self) -> None:
        super().__init__()
        self.completions: list[tuple[float, float, int]] = []  # (start s, latency s, tokens)


def completion_client(
    url: str, prompts: Sequence[str], seed: int, t0: float, stop: threading.Event, rec: Recorder
) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            body = {"prompt": rng.choice(prompts), "max_tokens": 8, "temperature": 0}
            if (answer := post_completion(client, url, body, rec)) is None:
                continue
            start, latency, r = answer
            if not r.is_success:
                rec.error(f"completion: HTTP {r.status_code}: {r.text}")
                continue
            tokens = int(r.json()["usage"]["completion_tokens"])
            with rec.lock:
                rec.completions.append((start - t0, latency, tokens))


def rss_sampler(
    daemon: DaemonProcess, t0: float, stop: threading.Event, series: list[list[float]]
) -> None:
    """Every second: [seconds, VmRSS MB, applied edits] of the daemon."""
    with httpx.Client(timeout=30) as client:
        while True:
            kb = rss_kb(daemon.pid)
            try:
                applied = client.get(daemon.url("/v1/status")).json()["edits"]["applied"]
            except (httpx.HTTPError, KeyError, ValueError):
                applied = -1
            if kb is not None:
                series.append([round(time.perf_counter() - t0, 2), round(kb / 1024, 2), applied])
            if stop.wait(1.0):
                return


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of ys on xs (None when xs do not vary)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def memory_report(
    series: list[list[float]], state_kb_per_edit: float | None, settle_s: float
) -> dict[str, Any]:
    """RSS over the whole window, and over its ``steady`` part from ``settle_s`` on (the
    first seconds of concurrent requests allocate their buffers)."""
    pts = [p for p in series if p[2] >= 0]
    steady = rss_stats([p for p in pts if p[0] >= settle_s], state_kb_per_edit)
    return rss_stats(pts, state_kb_per_edit) | {"steady": steady | {"from_s": settle_s}}


def rss_stats(pts: list[list[float]], state_kb_per_edit: float | None) -> dict[str, Any]:
    """Start/end/max RSS, growth (median of the last 5 samples minus that of the first 5),
    and the least-squares RSS slope per applied edit over ``pts``."""
    mb = [p[1] for p in pts]
    per_edit = slope([p[2] for p in pts], mb)
    growth = statistics.median(mb[-5:]) - statistics.median(mb[:5]) if mb else None
    counts = [p[2] for p in pts]
    applied = statistics.median(counts[-5:]) - statistics.median(counts[:5]) if pts else 0
    expected = None if state_kb_per_edit is None else applied * state_kb_per_edit / 1024
    mid = mb[len(mb) // 2] if mb else None
    return {
        "start_mb": mb[0] if mb else None,
        "mid_mb": mid,
        "end_mb": mb[-1] if mb else None,
        "max_mb": max(mb) if mb else None,
        "growth_mb": None if growth is None else round(growth, 2),
        "growth_second_half_mb": None if mid is None else round(mb[-1] - mid, 2),
        "applied_in_window": applied,
        "slope_kb_per_applied_edit": None if per_edit is None else round(per_edit * 1024, 1),
        "edit_state_mb_expected": None if expected is None else round(expected, 2),
        "growth_beyond_edit_state_mb": (
            None if growth is None or expected is None else round(growth - expected, 2)
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work
    router, requested = backend_setup(args.backends)
    n_stream = math.ceil(args.duration_s * args.edit_rate) + 1 if args.edit_rate > 0 else 0
    pool = load_edits(args.edits, args.preload + n_stream, requested)
    preload, stream = pool[: args.preload], pool[args.preload :]
    prompts = [e["prompt"] for e in pool]
    prompts += [p["prompt"] for e in pool for p in e.get("locality", [])]
    sections = bench_sections(work, args.model.resolve(), router, args.batch_size)
    daemon = DaemonProcess(write_config(work, sections))
    rec, series = Recorder(), list[list[float]]()
    stop, stop_sampler = threading.Event(), threading.Event()
    try:
        start_s = daemon.start()
        ready_kb = rss_kb(daemon.pid) or 0
        if preload:
            print(f"preloading {len(preload)} edits ...", flush=True)
            daemon.wait_settled(daemon.submit(preload), timeout=3600)
        preloaded_kb = rss_kb(daemon.pid) or 0
        daemon.complete(prompts[: args.clients * 2])  # warm-up: first-call allocations
        t0 = time.perf_counter()
        threads = [threading.Thread(target=rss_sampler, args=(daemon, t0, stop_sampler, series))]
        threads += [
            threading.Thread(
                target=completion_client,
                args=(daemon.url(""), prompts, args.seed + i, t0, stop, rec),
            )
            for i in range(args.clients)
        ]
        if stream:  # --edit-rate 0: completions only (a control for the memory figures)
            threads.append(
                threading.Thread(
                    target=edit_stream,
                    args=(daemon.url(""), stream, args.edit_rate, t0, stop, rec),
                )
            )
        for t in threads:
            t.start()
        print(f"load for {args.duration_s} s with {args.clients} clients ...", flush=True)
        time.sleep(args.duration_s)
        stop.set()
        for t in threads[1:]:
            t.join()
        window_s = time.perf_counter() - t0
        stop_sampler.set()
        threads[0].join()
        recs = daemon.wait_settled(rec.edit_ids, timeout=1800)
        after_drain_mb = (rss_kb(daemon.pid) or 0) / 1024
        checkpoint = daemon.client.post(daemon.url("/v1/checkpoints"), headers=JSON).json()
        state = folder_bytes(Path(checkpoint["path"]))
        applied_total = int(daemon.status()["edits"]["applied"])
        exit_code = daemon.terminate()
    finally:
        daemon.close()
    state_kb = state / 1024 / applied_total if applied_total else None
    memory = memory_report(series, state_kb, min(args.settle_s, args.duration_s / 4))
    memory.update(
        ready_mb=round(ready_kb / 1024, 2),
        after_preload_mb=round(preloaded_kb / 1024, 2),
        preload_growth_mb=round((preloaded_kb - ready_kb) / 1024, 2),
        after_drain_mb=round(after_drain_mb, 2),
        series=series,
    )
    return {
        "start_s": round(start_s, 2),
        "window_s": round(window_s, 2),
        "completions": completion_report(rec, window_s),
        "errors": len(rec.errors),
        "error_samples": rec.errors[:MAX_ERROR_SAMPLES],
        "edits": edit_report(recs),
        "edit_state": {
            "checkpoint_mb": round(state / 2**20, 2),
            "applied_edits": applied_total,
            "kb_per_edit": None if state_kb is None else round(state_kb, 1),
        },
        "memory": memory,
        "exit_code": exit_code,
    }


def completion_report(rec: Recorder, window_s: float) -> dict[str, Any]:
    latencies = [c[1] for c in rec.completions]
    tokens = sum(c[2] for c in rec.completions)
    return {
        "requests": len(rec.completions),
        "latency_s": summary(latencies),
        "requests_per_s": round(len(latencies) / window_s, 2),
        "tokens_per_s": round(tokens / window_s, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    r = result["run"]
    c, e, m = r["completions"], r["edits"], r["memory"]
    s = m["steady"]
    rows = [
        ["errors (non-2xx or exception)", r["errors"]],
        ["completion requests", c["requests"]],
        ["completion latency p50 / p95 / p99 s", _triple(c["latency_s"])],
        ["completions requests/s", c["requests_per_s"]],
        ["generated tokens/s", c["tokens_per_s"]],
        ["edits streamed / applied / failed", _triple(e, EDIT_COUNTS, "{}")],
        ["edit submit-to-applied p50 / p95 s", _triple(e["latency_s"], ("p50", "p95"))],
        ["RSS ready / after the preload (incl. one-time set-up) MB", _triple(m, PRE_KEYS, "{}")],
        ["RSS window start / end / max MB", _triple(m, MB_KEYS, "{}")],
        ["RSS growth in window MB", m["growth_mb"]],
        [f"steady part (from {s['from_s']} s): start / end / max MB", _triple(s, MB_KEYS, "{}")],
        ["steady part: growth MB", s["growth_mb"]],
        ["steady part: RSS slope kB per applied edit", s["slope_kb_per_applied_edit"]],
        ["edit state kB per edit (checkpoint size / edits)", r["edit_state"]["kb_per_edit"]],
        ["steady part: growth beyond the edit state MB", s["growth_beyond_edit_state_mb"]],
        ["RSS after drain MB", m["after_drain_mb"]],
    ]
    print(markdown_table(["metric", "value"], rows))


def _triple(
    s: dict[str, Any], keys: Sequence[str] = ("p50", "p95", "p99"), form: str = "{:.3f}"
) -> str:
    return " / ".join("-" if s[k] is None else form.format(s[k]) for k in keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--backends", default="auto", help="melo | hook | auto")
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--edit-rate", type=float, default=0.5, help="edits/s (0: none)")
    parser.add_argument("--preload", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10, help="[worker] batch_size")
    parser.add_argument("--settle-s", type=float, default=30.0, help="RSS steady part from")
    return run_main(parser, "load", "load-{model}-{backends}", run, print_table, argv)


if __name__ == "__main__":
    raise SystemExit(main())
