"""Maximum-size completions in parallel while edits are queued: do edits and /healthz get through?

A fresh daemon (subprocess, 127.0.0.1, one torch thread, drift/feeds/nightly off,
``[api] max_concurrent_completions = --max-concurrent``) serves, for ``--duration-s``
seconds, ``--clients`` threads that each send maximum-size completion requests back
to back (``--prompts`` prompts of the edit set, ``max_tokens`` = the server's limit,
temperature 1, seeded); a refused request (429) waits for its ``Retry-After``. Meanwhile
one thread submits an edit every ``1 / --edit-rate`` seconds through ``POST /v1/edits``
(after one warm-up edit, applied before the window: the first apply's one-time set-up)
and a prober sends ``GET /healthz`` every ``--probe-s`` seconds (each probe on a new
connection, as a load balancer's check would).

Reported: completion answers by status (200, 429, others), tokens generated, the
latency of the answered ones; the edits' submit-to-applied latency (the worker waits
for the engine lock at most one prompt's generation, far below its lease); the
/healthz latencies, the share answered within 1 s and the failures (acceptance: all
within 1 s, none failed).

    .venv/bin/editd world build --size micro --out var/worlds/micro-llama
    .venv/bin/editd world edits --model var/worlds/micro-llama --n 100 \
        --out var/evals/micro-cf-100.jsonl
    .venv/bin/python -m bench.completions_load --model var/worlds/micro-llama \
        --edits var/evals/micro-cf-100.jsonl --duration-s 60

Writes ``bench/results/completions-load-<model>[-<tag>].json``; prints a markdown
table. The machine is shared (2 cores): latencies are noisy.
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.daemon_cli import base_parser, run_main
from bench.daemon_process import (
    DaemonProcess,
    backend_setup,
    bench_sections,
    load_edits,
    write_config,
)
from bench.load_clients import StreamRecorder, edit_report, edit_stream, post_completion
from bench.stats import markdown_table, summary
from daemon.config import ApiConfig

HEALTHZ_BUDGET_S = 1.0
MAX_ERROR_SAMPLES = 20


class Recorder(StreamRecorder):
    """Thread-safe lists of what every request got."""

    def __init__(self) -> None:
        super().__init__()
        self.completions: list[tuple[float, float, int, int]] = []  # start, latency, status, tokens
        self.health: list[tuple[float, float, int]] = []  # start, latency, status (0: no answer)


def completion_client(
    url: str, body: dict[str, Any], t0: float, stop: threading.Event, rec: Recorder
) -> None:
    with httpx.Client(timeout=600) as client:
        while not stop.is_set():
            if (answer := post_completion(client, url, body, rec)) is None:
                continue
            start, latency, r = answer
            tokens = int(r.json()["usage"]["completion_tokens"]) if r.status_code == 200 else 0
            with rec.lock:
                rec.completions.append((start - t0, latency, r.status_code, tokens))
            if r.status_code == 429:
                stop.wait(float(r.headers.get("retry-after", "1")))
            elif r.status_code != 200:
                rec.error(f"completion: HTTP {r.status_code}: {r.text}")
                stop.wait(1.0)


def health_prober(
    url: str, every_s: float, t0: float, stop: threading.Event, rec: Recorder
) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            status = httpx.get(f"{url}/healthz", timeout=10).status_code
        except httpx.HTTPError as exc:
            rec.error(f"healthz: {type(exc).__name__}: {exc}")
            status = 0
        with rec.lock:
            rec.health.append((start - t0, time.perf_counter() - start, status))
        stop.wait(max(0.0, every_s - (time.perf_counter() - start)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work
    router, requested = backend_setup(args.backends)
    n_stream = math.ceil(args.duration_s * args.edit_rate) + 1
    *pool, warm_up = load_edits(args.edits, n_stream + 1, requested)
    rng = random.Random(args.seed)
    prompts = [rng.choice(pool)["prompt"] for _ in range(args.prompts)]
    max_tokens = ApiConfig().max_tokens_limit
    body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 1.0, "seed": args.seed}
    api = {"max_concurrent_completions": args.max_concurrent}
    sections = bench_sections(work, args.model.resolve(), router, args.batch_size, api=api)
    daemon = DaemonProcess(write_config(work, sections))
    rec = Recorder()
    stop = threading.Event()
    try:
        start_s = daemon.start()
        daemon.complete(prompts[:4])  # warm-up: first-call allocations, and the first
        daemon.wait_settled(daemon.submit([warm_up]))  # apply (the hook's statistics)
        url = daemon.url("")
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=completion_client, args=(url, body, t0, stop, rec))
            for _ in range(args.clients)
        ]
        threads.append(
            threading.Thread(target=edit_stream, args=(url, pool, args.edit_rate, t0, stop, rec))
        )
        threads.append(
            threading.Thread(target=health_prober, args=(url, args.probe_s, t0, stop, rec))
        )
        for t in threads:
            t.start()
        print(f"{args.clients} completion clients for {args.duration_s} s ...", flush=True)
        time.sleep(args.duration_s)
        stop.set()
        for t in threads:
            t.join()
        window_s = time.perf_counter() - t0
        recs = daemon.wait_settled(rec.edit_ids, timeout=1800)
        exit_code = daemon.terminate()
    finally:
        daemon.close()
    return {
        "start_s": round(start_s, 2),
        "window_s": round(window_s, 2),
        "request": {"prompts": len(prompts), "max_tokens": max_tokens, "temperature": 1.0},
        "completions": completion_report(rec, window_s),
        "edits": edit_report(recs),
        "healthz": health_report(rec),
        "errors": len(rec.errors),
        "error_samples": rec.errors[:MAX_ERROR_SAMPLES],
        "exit_code": exit_code,
    }


def completion_report(rec: Recorder, window_s: float) -> dict[str, Any]:
    answered = [c for c in rec.completions if c[2] == 200]
    by_status: dict[str, int] = {}
    for c in rec.completions:
        by_status[str(c[2])] = by_status.get(str(c[2]), 0) + 1
    tokens = sum(c[3] for c in answered)
    return {
        "by_status": by_status,
        "latency_s": summary([c[1] for c in answered]),
        "tokens": tokens,
        "tokens_per_request": round(tokens / len(answered), 1) if answered else None,
        "tokens_per_s": round(tokens / window_s, 1),
    }


def health_report(rec: Recorder) -> dict[str, Any]:
    latencies = [h[1] for h in rec.health if h[2] == 200]
    within = sum(1 for h in rec.health if h[2] == 200 and h[1] <= HEALTHZ_BUDGET_S)
    return {
        "probes": len(rec.health),
        "ok": len(latencies),
        "failed": len(rec.health) - len(latencies),
        "within_1s": within,
        "latency_s": summary(latencies, digits=4),
    }


def print_table(result: dict[str, Any]) -> None:
    r = result["run"]
    c, e, h = r["completions"], r["edits"], r["healthz"]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(c["by_status"].items()))
    rows = [
        ["completion answers by status", statuses],
        ["completion latency (200s) p50 / p95 / max s", _triple(c["latency_s"])],
        ["generated tokens (per answered request, per s)", _pair(c, "tokens_per_request")],
        ["edits submitted / applied / failed", _counts(e, ("submitted", "applied", "failed"))],
        ["edit submit-to-applied p50 / p95 / max s", _triple(e["latency_s"])],
        ["/healthz probes / ok / within 1 s", _counts(h, ("probes", "ok", "within_1s"))],
        ["/healthz latency p50 / p99 / max s", _triple(h["latency_s"], ("p50", "p99", "max"))],
        ["client errors (exceptions, non-200/429)", r["errors"]],
    ]
    print(markdown_table(["metric", "value"], rows))


def _triple(s: dict[str, Any], keys: Sequence[str] = ("p50", "p95", "max")) -> str:
    return " / ".join("-" if s[k] is None else f"{s[k]:.3f}" for k in keys)


def _counts(s: dict[str, Any], keys: Sequence[str]) -> str:
    return " / ".join(str(s[k]) for k in keys)


def _pair(c: dict[str, Any], key: str) -> str:
    return f"{c['tokens']} ({c[key]}, {c['tokens_per_s']})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--backends", default="auto", help="melo | hook | auto")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=50)
    defaults = ApiConfig()
    parser.add_argument("--prompts", type=int, default=defaults.max_prompts_per_completion)
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent_completions)
    parser.add_argument("--edit-rate", type=float, default=1.0, help="edits/s")
    parser.add_argument("--probe-s", type=float, default=0.2, help="/healthz every ... s")
    parser.add_argument("--batch-size", type=int, default=10, help="[worker] batch_size")
    return run_main(parser, "completions_load", "completions-load-{model}", run, print_table, argv)


if __name__ == "__main__":
    raise SystemExit(main())
