"""Edit throughput and submit-to-applied latency through a running ``editd serve``.

For each back-end setting (``--backends melo,auto``: ``melo`` = MELO only, ``hook`` =
hook with MELO taking its escalations, ``auto`` = the router decides) and each
``[worker] batch_size`` (``--batch-sizes 1,10,50``) a fresh daemon on a fresh store is
started as a subprocess (drift off, hook layers 2-3 with prompt-last keys, one torch
thread, ``max_wait_s`` 0.1). One warm-up edit is applied first (one-time set-up such as
MELO's radius calibration stays off the clock); then the N edits are submitted in one
``POST /v1/edits`` and the benchmark polls ``GET /v1/edits`` until every one is settled.

Reported per run: edits/s from the submit to the last applied edit, the per-edit
``applied_at - created_at`` latency (p50/p95/max; with everything submitted at once it is
mostly queueing: edit k waits for the k-1 before it), its split into the wait before the
worker claimed the edit and the time in its batch (``edit_claimed`` events, read from
the SQLite file after the daemon stopped), how many edits were applied (and verified),
failed or escalated from the hook to MELO, and the daemon's own
``editd_submit_to_applied_seconds`` histogram from ``/metrics`` (count, mean, and the
bucket bounds holding p50/p95).

    .venv/bin/python -m bench.throughput --n 200 --backends melo,auto --batch-sizes 1,10,50

Writes ``bench/results/throughput-<model>-<N>-<backends>.json``; prints a markdown table.
The machine is shared (2 cores): absolute figures are noisy, compare rows of one run.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.daemon_process import (
    DaemonProcess,
    backend_setup,
    bench_sections,
    histogram,
    histogram_delta,
    hook_layers,
    load_edits,
    write_config,
)
from bench.stats import (
    DEFAULT_EDITS,
    DEFAULT_MODEL,
    REPO,
    RESULTS,
    machine_info,
    markdown_table,
    summary,
    write_result,
)

METRIC = "editd_submit_to_applied_seconds"


def claimed_at(store_path: Path) -> dict[str, float]:
    """Each edit's last ``edit_claimed`` time, read-only from the store's events table."""
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT edit_id, MAX(ts) FROM events WHERE kind = 'edit_claimed' GROUP BY edit_id"
        ).fetchall()
    finally:
        db.close()
    return {str(i): float(ts) for i, ts in rows}


def run_one(
    work: Path,
    model: Path,
    edits: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    backends: str,
    batch_size: int,
) -> dict[str, Any]:
    """One fresh daemon at ``batch_size``: warm up, submit ``edits`` at once, measure."""
    shutil.rmtree(work, ignore_errors=True)
    router, _ = backend_setup(backends)
    config = write_config(work, bench_sections(work, model, router, batch_size))
    daemon = DaemonProcess(config)
    try:
        start_s = daemon.start()
        if warmup:
            daemon.wait_settled(daemon.submit(warmup))
        before = histogram(daemon.metrics(), METRIC)
        t0 = time.time()
        ids = daemon.submit(edits)
        submit_s = time.time() - t0
        recs = daemon.wait_settled(ids, timeout=3600)
        metrics = histogram_delta(before, histogram(daemon.metrics(), METRIC))
        daemon.terminate()
    finally:
        daemon.close()
    claims = claimed_at(work / "editd.sqlite3")
    return measure(recs, claims, t0) | {
        "backends": backends,
        "batch_size": batch_size,
        "start_s": round(start_s, 2),
        "submit_s": round(submit_s, 3),
        "warmup_edits": len(warmup),
        "daemon_histogram": metrics,
    }


def measure(recs: dict[str, dict[str, Any]], claims: dict[str, float], t0: float) -> dict[str, Any]:
    """Counts, throughput and latency of the settled records ``recs`` submitted at ``t0``."""
    applied = [r for r in recs.values() if r["status"] == "applied"]
    failed = [r for r in recs.values() if r["status"] == "failed"]
    last_applied = max((r["applied_at"] for r in applied), default=t0)
    last_settled = max((r["updated_at"] for r in recs.values()), default=t0)
    latency = [r["applied_at"] - r["created_at"] for r in applied]
    waited = [claims[r["id"]] - r["created_at"] for r in applied if r["id"] in claims]
    in_batch = [r["applied_at"] - claims[r["id"]] for r in applied if r["id"] in claims]
    by_backend: dict[str, int] = {}
    for r in applied:
        by_backend[r["backend"]] = by_backend.get(r["backend"], 0) + 1
    verified = sum(
        1 for r in applied if ((r.get("result") or {}).get("verification") or {}).get("passed")
    )
    editor = [(r.get("result") or {}).get("editor", {}) for r in applied]
    escalated = sum(1 for details in editor if "escalated_from" in details)
    seconds = last_applied - t0
    return {
        "n": len(recs),
        "applied": len(applied),
        "verified": verified,
        "failed": len(failed),
        "other": len(recs) - len(applied) - len(failed),
        "escalated_to_melo": escalated,
        "applied_by_backend": by_backend,
        "failure_reasons": sorted({str(r["error"])[:120] for r in failed}),
        "seconds_to_last_applied": round(seconds, 3),
        "seconds_to_last_settled": round(last_settled - t0, 3),
        "edits_per_s": round(len(applied) / seconds, 3) if seconds > 0 else None,
        "latency_s": summary(latency),
        "queue_wait_s": summary(waited),
        "in_batch_s": summary(in_batch),
    }


def print_table(runs: Sequence[dict[str, Any]]) -> None:
    headers = [
        "back-ends", "batch", "edits", "applied", "verified", "failed", "escalated",
        "s to last", "edits/s", "p50 s", "p95 s", "max s", "in-batch p50 s", "daemon hist mean s",
    ]  # fmt: skip
    rows = []
    for r in runs:
        lat, hist = r["latency_s"], r["daemon_histogram"] or {}
        rows.append([
            r["backends"], r["batch_size"], r["n"], r["applied"], r["verified"], r["failed"],
            r["escalated_to_melo"], r["seconds_to_last_applied"], r["edits_per_s"],
            lat["p50"], lat["p95"], lat["max"], r["in_batch_s"]["p50"], hist.get("mean_s"),
        ])  # fmt: skip
    print(markdown_table(headers, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--edits", type=Path, default=DEFAULT_EDITS)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-sizes", default="1,10,50")
    parser.add_argument("--backends", default="melo", help="comma list of melo | hook | auto")
    parser.add_argument("--warmup", type=int, default=1, help="edits applied before the clock")
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench" / "throughput")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    settings = [b.strip() for b in args.backends.split(",") if b.strip()]
    runs = []
    for backends in settings:
        _, requested = backend_setup(backends)
        pool = load_edits(args.edits, args.n + args.warmup, requested)
        edits, warmup = pool[: args.n], pool[args.n :]
        for size in sizes:
            print(f"{backends}, batch size {size}: {args.n} edits ...", flush=True)
            work = args.work / f"{backends}-b{size}"
            run = run_one(work, args.model.resolve(), edits, warmup, backends, size)
            print(
                f"  {run['applied']} applied, {run['failed']} failed in "
                f"{run['seconds_to_last_applied']} s ({run['edits_per_s']} edits/s)",
                flush=True,
            )
            runs.append(run)
    result = {
        "benchmark": "throughput",
        "model": args.model.name,
        "edits_file": str(args.edits),
        "n_edits": args.n,
        "batch_sizes": sizes,
        "backends": settings,
        "config": {
            "max_wait_s": 0.1,
            "drift": False,
            "hook_layers": hook_layers(args.model),
            "torch_threads": 1,
        },
        "runs": runs,
        "machine": machine_info(),
        "command": " ".join([".venv/bin/python -m bench.throughput", *argv]),
    }
    print()
    print_table(runs)
    tag = "-".join(settings)
    path = write_result(args.out, f"throughput-{args.model.name}-{args.n}-{tag}.json", result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
