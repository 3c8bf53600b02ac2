"""The daemon with its default configuration on a real model: edits, drift checks, memory.

One ``editd serve`` child process whose config names only the model, the state paths
and one torch thread; everything else is the default, drift validation included (the
shipped common-facts probes, checked every ``[drift] every_batches`` batches). The
first N records of a benchmark file (CounterFact by default) are submitted as ``auto``
edits in one ``POST /v1/edits``; the benchmark polls until every edit is settled,
sampling the daemon's RSS, and reads ``/metrics`` for the drift runs.

Reported: applied and failed edits by back-end, failures split by cause (verification,
drift rollback, other), the drift runs (passed / failed, the last top-1 agreement and
mean KL), the daemon's RSS after start-up and at its peak, and seconds per applied
edit (submit to the last edit settled). Which probes an edit changes is measured
outside the daemon by ``bench.inference``; this is the service's own view.

    .venv/bin/python -m bench.serve_defaults --model var/models/smollm2-135m-instruct \\
        --edits ../shared/data/counterfact/counterfact-edit.json --format counterfact --n 300

Writes ``bench/results/serve-defaults-<model>-<N>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.daemon_process import DaemonProcess, rss_kb, write_config
from bench.inference import edit_records
from bench.stats import REPO, RESULTS, markdown_table, result_header, write_result

DRIFT_CAUSE = re.compile(r"drift", re.IGNORECASE)
VERIFY_CAUSE = re.compile(r"verif", re.IGNORECASE)


def default_sections(work: Path, model: Path) -> dict[str, dict[str, Any]]:
    """Only what a user must name: the model, where state lives, one thread; feeds off."""
    return {
        "model": {"name_or_path": str(model), "threads": 1},
        "store": {"path": str(work / "editd.sqlite3")},
        "checkpoints": {"dir": str(work / "checkpoints")},
        "feeds": {"enabled": False, "spool_dir": str(work / "spool")},
        "log": {"level": "info", "format": "json"},
    }


def requests_of(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API request of each benchmark record: prompt, target, subject, ``auto``."""
    out = []
    for r in records:
        req = {"prompt": r["prompt"], "target": r["target"], "backend": "auto"}
        if r.get("subject"):
            req["subject"] = r["subject"]
        out.append(req)
    return out


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """One sample of a Prometheus text exposition, by name and exact label set."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def drift_view(metrics_text: str) -> dict[str, Any]:
    return {
        "runs_passed": metric_value(metrics_text, "editd_drift_runs_total", 'outcome="passed"'),
        "runs_failed": metric_value(metrics_text, "editd_drift_runs_total", 'outcome="failed"'),
        "top1_agreement": metric_value(metrics_text, "editd_drift_top1_agreement"),
        "mean_kl": metric_value(metrics_text, "editd_drift_mean_kl"),
        "retention": metric_value(metrics_text, "editd_drift_retention"),
    }


def failure_cause(record: dict[str, Any]) -> str:
    error = str(record.get("error") or "")
    if DRIFT_CAUSE.search(error):
        return "drift"
    if VERIFY_CAUSE.search(error):
        return "verification"
    return "other"


def summarise(recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    applied = [r for r in recs.values() if r["status"] == "applied"]
    failed = [r for r in recs.values() if r["status"] == "failed"]
    return {
        "n": len(recs),
        "applied": len(applied),
        "failed": len(failed),
        "other": len(recs) - len(applied) - len(failed),
        "applied_by_backend": dict(Counter(str(r["backend"]) for r in applied)),
        "failed_by_cause": dict(Counter(failure_cause(r) for r in failed)),
        "failure_examples": sorted({str(r["error"])[:160] for r in failed})[:10],
    }


def run(
    work: Path, model: Path, requests: Sequence[dict[str, Any]], timeout: float
) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    daemon = DaemonProcess(write_config(work, default_sections(work, model)))
    try:
        startup = daemon.start(timeout=3600.0)  # first start: covariance, locate, probes
        base_rss = rss_kb(daemon.pid) or 0
        t0 = time.perf_counter()
        ids = daemon.submit(requests)
        peak = base_rss
        timeline: list[list[float | int | None]] = []
        deadline = time.monotonic() + timeout
        while True:
            recs = daemon.records(ids)
            peak = max(peak, rss_kb(daemon.pid) or 0)
            done = sum(r["status"] not in ("queued", "applying") for r in recs.values())
            view = drift_view(daemon.metrics())
            if not timeline or timeline[-1][1:] != [done, view["runs_passed"], view["runs_failed"]]:
                timeline.append([round(time.perf_counter() - t0, 1), done,
                                 view["runs_passed"], view["runs_failed"]])  # fmt: skip
            if done == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        seconds = time.perf_counter() - t0
        daemon.wait_idle(timeout=600)
        final = drift_view(daemon.metrics())
        summary = summarise(daemon.records(ids))
        return {
            **summary,
            "settled": done,
            "timed_out": done < len(ids),
            "startup_s": round(startup, 1),
            "seconds": round(seconds, 1),
            "s_per_applied_edit": round(seconds / max(1, summary["applied"]), 3),
            "rss_mb": {"after_start": round(base_rss / 1024, 1), "peak": round(peak / 1024, 1)},
            "drift": final,
            "timeline": timeline,
        }
    finally:
        daemon.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--edits", type=Path, required=True)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=4 * 3600.0)
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench" / "serve-defaults")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    records = edit_records(args.edits, args.format, args.n)[: args.n]
    result = {
        **result_header("serve_defaults", args, argv),
        **run(args.work, args.model.resolve(), requests_of(records), args.timeout),
    }
    headers = ["edits", "applied", "failed (verification / drift / other)", "by back-end",
               "drift runs passed / failed", "top-1 agreement", "mean KL", "s/edit",
               "RSS after start MB", "peak RSS MB"]  # fmt: skip
    fails = result["failed_by_cause"]
    drift = result["drift"]
    row = [
        result["n"], result["applied"],
        f"{result['failed']} ({fails.get('verification', 0)} / {fails.get('drift', 0)} / "
        f"{fails.get('other', 0)})",
        result["applied_by_backend"], f"{drift['runs_passed']} / {drift['runs_failed']}",
        drift["top1_agreement"], drift["mean_kl"], result["s_per_applied_edit"],
        result["rss_mb"]["after_start"], result["rss_mb"]["peak"],
    ]  # fmt: skip
    print(markdown_table(headers, [row]))
    path = write_result(args.out, f"serve-defaults-{args.model.name}-{args.n}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
