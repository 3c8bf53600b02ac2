"""A crash soak of ``editd serve``: kill -9 under load, restart, check the invariants.

One store and one checkpoint folder for the whole run (``[checkpoints] every_edits``
small, so restarts mix a checkpoint with a replay of the log). The daemon is started;
then each cycle runs ``--clients`` completion clients and an edit stream
(``--edit-rate`` edits/s, one ``POST /v1/edits`` each, with the edit set's client ids)
for a seeded random ``--min-run-s``..``--max-run-s`` seconds, sends SIGKILL at that
moment and restarts the daemon on the same store. An edit whose POST got no answer
because of the kill is submitted again after the restart (the client retry the
idempotency rules are for). After each restart, with the daemon ready again:

- lost: a submitted edit that got an id and is not in the store's ``edits`` table;
- doubled: an edit with more than one ``edit_applied`` event in the store's ``events``
  table, or two live rows with the same content hash (read with sqlite3, read-only);
- regressed: an edit seen ``applied`` at an earlier check that is no longer ``applied``;
- inconsistent: an ``applied`` edit whose prompt does not answer its target's first word
  (greedy, ``POST /v1/completions``, after the restart);
- errors: a non-2xx answer or an exception while the daemon was alive.

All must be 0. At the end the queue is drained, the invariants are checked once more
and the daemon stops with SIGTERM. Restart time is from spawning ``editd serve`` to
``/healthz`` 200 (process start, imports, model load, checkpoint restore, replay).

    .venv/bin/python -m bench.soak --cycles 8

Writes ``bench/results/soak-<model>-<backends>[-<tag>].json``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.daemon_cli import base_parser, run_main
from bench.daemon_process import DaemonProcess, backend_setup, bench_sections, load_edits
from bench.daemon_process import write_config as write_daemon_config
from bench.stats import markdown_table, summary
from daemon.model.answers import continuation_matches

LIVE = ("queued", "applying", "applied", "quarantined")
VIOLATIONS = (
    "lost", "doubled_apply", "doubled_rows", "applied_without_event", "regressed", "inconsistent"
)  # fmt: skip
CHUNK = 32  # prompts per completion request ([api] max_prompts_per_completion)


class Soak:
    """The run's memory across daemon lifetimes: what was submitted and seen applied."""

    def __init__(self, pool: list[dict[str, Any]]) -> None:
        self.pool = pool
        self.next = 0
        self.submitted: dict[str, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []  # POST lost to a kill: submit again
        self.ever_applied: set[str] = set()
        self.retries_deduplicated = 0
        self.errors: list[str] = []
        self.completions = 0
        self.lock = threading.Lock()

    def take(self) -> dict[str, Any] | None:
        with self.lock:
            if self.pending:
                return self.pending.pop(0)
            if self.next >= len(self.pool):
                return None
            self.next += 1
            return self.pool[self.next - 1]


def stream(url: str, soak: Soak, rate: float, dying: threading.Event) -> None:
    """Submit the next edit every ``1 / rate`` s until the daemon is being killed."""
    with httpx.Client(timeout=60) as client:
        while not dying.wait(1.0 / rate):
            edit = soak.take()
            if edit is None:
                return
            try:
                r = client.post(f"{url}/v1/edits", json={"edits": [edit]})
                r.raise_for_status()
            except httpx.HTTPError as exc:
                with soak.lock:
                    soak.pending.append(edit)
                    if not dying.is_set():
                        soak.errors.append(f"edit: {type(exc).__name__}: {exc}"[:300])
                continue
            result = r.json()["results"][0]
            with soak.lock:
                soak.submitted[result["id"]] = edit
                soak.retries_deduplicated += 0 if result["created"] else 1


def complete_loop(
    url: str, prompts: list[str], seed: int, soak: Soak, dying: threading.Event
) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as client:
        while not dying.is_set():
            body = {"prompt": rng.choice(prompts), "max_tokens": 8, "temperature": 0}
            try:
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
            except httpx.HTTPError as exc:
                with soak.lock:
                    if not dying.is_set():
                        soak.errors.append(f"completion: {type(exc).__name__}: {exc}"[:300])
                continue
            with soak.lock:
                soak.completions += 1


def run_and_kill(daemon: DaemonProcess, soak: Soak, args: argparse.Namespace, run_s: float) -> None:
    """Load for ``run_s`` seconds, then SIGKILL the daemon; what was in flight is pending."""
    prompts = [e["prompt"] for e in soak.pool[:200]]
    prompts += [p["prompt"] for e in soak.pool[:200] for p in e.get("locality", [])]
    dying = threading.Event()
    url = daemon.url("")
    threads = [threading.Thread(target=stream, args=(url, soak, args.edit_rate, dying))]
    threads += [
        threading.Thread(target=complete_loop, args=(url, prompts, args.seed + i, soak, dying))
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    time.sleep(run_s)
    dying.set()
    daemon.kill()
    for t in threads:
        t.join()


def store_check(store_path: Path, soak: Soak) -> dict[str, Any]:
    """lost / doubled / regressed from the SQLite file (read-only) and the applied ids."""
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = {i: (s, h) for i, s, h in db.execute("SELECT id, status, content_hash FROM edits")}
        applies = dict(
            db.execute(
                "SELECT edit_id, COUNT(*) FROM events WHERE kind = 'edit_applied' GROUP BY edit_id"
            ).fetchall()
        )
    finally:
        db.close()
    live_hashes = [h for s, h in rows.values() if s in LIVE]
    applied = {i for i, (s, _) in rows.items() if s == "applied"}
    statuses: dict[str, int] = {}
    for i in soak.submitted:
        status = rows[i][0] if i in rows else "missing"
        statuses[status] = statuses.get(status, 0) + 1
    out = {
        "lost": sorted(i for i in soak.submitted if i not in rows),
        "doubled_apply": sorted(i for i, n in applies.items() if n > 1),
        "doubled_rows": len(live_hashes) - len(set(live_hashes)),
        "applied_without_event": sorted(i for i in applied if applies.get(i, 0) == 0),
        "regressed": sorted(soak.ever_applied - applied),
        "statuses": statuses,
    }
    soak.ever_applied |= applied
    return out | {"applied_ids": sorted(applied)}


def answer_check(daemon: DaemonProcess, soak: Soak, applied: Sequence[str]) -> dict[str, Any]:
    """Every applied edit's prompt answers its target's first word (greedy)."""
    edits = [soak.submitted[i] for i in applied if i in soak.submitted]
    wrong = []
    for k in range(0, len(edits), CHUNK):
        chunk = edits[k : k + CHUNK]
        outs = daemon.complete([e["prompt"] for e in chunk], max_tokens=8)
        for e, out in zip(chunk, outs, strict=True):
            first = " " + e["target"].split()[0]
            if not continuation_matches(out, first):
                wrong.append({"id": e["id"], "target": e["target"], "output": out})
    return {"answers_checked": len(edits), "inconsistent": wrong}


def check(daemon: DaemonProcess, soak: Soak, store_path: Path) -> dict[str, Any]:
    found = store_check(store_path, soak)
    found |= answer_check(daemon, soak, found.pop("applied_ids"))
    found["restore"] = daemon.status().get("restore")
    return found


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Each violation summed over the checks (all must be 0)."""
    return {k: sum(r[k] if isinstance(r[k], int) else len(r[k]) for r in rows) for k in VIOLATIONS}


def soak_run(args: argparse.Namespace) -> dict[str, Any]:
    router, requested = backend_setup(args.backends)
    soak = Soak(load_edits(args.edits, args.n_edits, requested))
    work = args.work
    over = {"checkpoints": {"every_edits": args.every_edits}, "worker": {"max_wait_s": 1.0}}
    sections = bench_sections(work, args.model.resolve(), router, args.batch_size, **over)
    config = write_daemon_config(work, sections)
    store_path = work / "editd.sqlite3"
    rng = random.Random(args.seed)
    daemon = DaemonProcess(config)
    rows: list[dict[str, Any]] = []
    try:
        first_start_s = daemon.start()
        for cycle in range(1, args.cycles + 1):
            run_s = round(rng.uniform(args.min_run_s, args.max_run_s), 2)
            before = len(soak.submitted)
            run_and_kill(daemon, soak, args, run_s)
            restart_s = daemon.start()
            row = {"cycle": cycle, "killed_after_s": run_s, "restart_s": round(restart_s, 2)}
            row["submitted_in_cycle"] = len(soak.submitted) - before
            row["pending_at_kill"] = len(soak.pending)
            rows.append(row | check(daemon, soak, store_path))
            print(_row_line(rows[-1]), flush=True)
        for edit in list(soak.pending):  # the last kill's in-flight edits, once more
            soak.submitted[daemon.submit([edit])[0]] = edit
        soak.pending.clear()
        daemon.wait_idle(timeout=1800)
        final = {"cycle": "drained", "killed_after_s": None, "restart_s": None} | check(
            daemon, soak, store_path
        )
        rows.append(final)
        print(_row_line(final), flush=True)
        exit_code = daemon.terminate()
    finally:
        daemon.close()
    restarts = [r["restart_s"] for r in rows if r["restart_s"] is not None]
    return {
        "first_start_s": round(first_start_s, 2),
        "cycles": rows,
        "totals": totals(rows)
        | {
            "errors": len(soak.errors),
            "submitted": len(soak.submitted),
            "applied_at_end": rows[-1]["statuses"].get("applied", 0),
            "completions_served": soak.completions,
            "retries_deduplicated": soak.retries_deduplicated,
        },
        "restart_s": summary(restarts, digits=2),
        "error_samples": soak.errors[:20],
        "exit_code": exit_code,
    }


def _row_line(r: dict[str, Any]) -> str:
    return (
        f"cycle {r['cycle']}: restart {r['restart_s']} s, lost {len(r['lost'])}, doubled "
        f"{len(r['doubled_apply']) + r['doubled_rows']}, regressed {len(r['regressed'])}, "
        f"inconsistent {len(r['inconsistent'])}/{r['answers_checked']}, {r['statuses']}"
    )


def print_table(result: dict[str, Any]) -> None:
    headers = [
        "cycle", "killed after s", "restart s", "submitted", "applied", "lost", "doubled",
        "regressed", "inconsistent / checked", "restore: from ck / replayed / requeued",
    ]  # fmt: skip
    rows = []
    for r in result["run"]["cycles"]:
        restore = r["restore"] or {}
        rows.append([
            r["cycle"], r["killed_after_s"], r["restart_s"], r.get("submitted_in_cycle", "-"),
            r["statuses"].get("applied", 0), len(r["lost"]),
            len(r["doubled_apply"]) + r["doubled_rows"] + len(r["applied_without_event"]),
            len(r["regressed"]), f"{len(r['inconsistent'])} / {r['answers_checked']}",
            f"{restore.get('from_checkpoint')} / {restore.get('replayed')} / "
            f"{restore.get('requeued')}",
        ])  # fmt: skip
    print(markdown_table(headers, rows))
    t = result["run"]["totals"]
    print(f"\ntotals: {t}\nrestart s: {result['run']['restart_s']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--n-edits", type=int, default=400, help="edits available to stream")
    parser.add_argument("--backends", default="melo", help="melo | hook | auto")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--edit-rate", type=float, default=2.0, help="edits per second")
    parser.add_argument("--min-run-s", type=float, default=3.0)
    parser.add_argument("--max-run-s", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=10, help="[worker] batch_size")
    parser.add_argument("--every-edits", type=int, default=5, help="checkpoint cadence")
    return run_main(parser, "soak", "soak-{model}-{backends}", soak_run, print_table, argv)


if __name__ == "__main__":
    raise SystemExit(main())
