"""Restore time with N applied edits: how long a restart takes, from a checkpoint or the log.

Builds a store holding N applied edits through the real :class:`daemon.service.daemon.Daemon`
(in-process; checkpoints only on request, drift and scheduler off), writing a
checkpoint after 90% of the edits and one after all of them, then restarts the
daemon three ways, each a fresh ``Daemon(config).start()``:

(a) from the checkpoint holding all N edits (nothing to replay; ``--repeat`` times);
(b) with every checkpoint marked bad: a full replay of the N edits from the store;
(c) with the newest checkpoint marked bad: from the 90% one plus replay of the last 10%.

They run in the order (a), (c), (b), since marking a checkpoint bad is one-way.
``--skip-full-replay`` leaves (b) out (it replays every edit: the longest part).

Checkpoint writes are timed as ``Daemon.checkpoint`` runs them: the 90% and 100%
ones, then ``--write-repeat`` more of the full state, each marked bad as soon as it
is written (so the restarts still find the 90% and 100% ones); the table shows the
median of the full-state writes.

Each row reports ``Daemon.start()`` in total (model load, editors, restore, worker)
and its restore part (``Daemon.restore_report.seconds``). Replays verify each edit
as the daemon does (``[worker] verify``). The table is printed and the JSON written
to ``bench/results/restore-<model>-<N>.json`` (``-hook+melo`` added with both back-ends:
edits then go ``auto``, and the router sends them to the hook back-end first).
Past the ``--edits`` file's edits the pool is topped up from the world's probe split
(``bench.cost.edit_pool``; the world has ~2,070 editable facts in all).

    .venv/bin/python -m bench.restore --n 1000 --backends melo
    .venv/bin/python -m bench.restore --n 2000 --backends hook,melo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.cost import edit_pool
from daemon.config import Config, parse_config
from daemon.log import configure_logging
from daemon.service.daemon import Daemon
from store.checkpoints import list_checkpoints, mark_bad
from store.db import Store

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "var" / "worlds" / "small-llama"
DEFAULT_EDITS = REPO / "var" / "evals" / "world-cf-1000.jsonl"
RESULTS = REPO / "bench" / "results"
NEVER = 10**9  # checkpoint cadence that never fires: checkpoints only on request


def bench_config(
    work: Path, model: Path, backends: Sequence[str], batch_size: int, hook: dict[str, Any]
) -> Config:
    """The daemon's config for the benchmark: state under ``work``, nothing periodic."""
    data: dict[str, Any] = {
        "model": {"name_or_path": str(model), "threads": 1},
        "store": {"path": str(work / "editd.sqlite3")},
        "router": {"backends": list(backends)},
        # prompt-last MELO keys, as the hook's: the fact world's edits share subjects
        "editors": {"melo": {"max_blocks": 2048, "key_position": "prompt_last"}, "hook": hook},
        "worker": {"batch_size": batch_size, "max_wait_s": 0.05, "poll_interval_s": 0.05},
        "scheduler": {"enabled": False},
        "checkpoints": {"dir": str(work / "checkpoints"), "every_edits": NEVER},
        "drift": {"enabled": False},
        "feeds": {"enabled": False, "spool_dir": str(work / "spool")},
        "log": {"level": "warning", "format": "console"},
    }
    data["checkpoints"]["every_minutes"] = float(NEVER)
    return parse_config(data, source=None, env={})


def _wait_idle(daemon: Daemon, total: int, t0: float, every_s: float = 30.0) -> dict[str, int]:
    """Wait until the queue is empty; print progress every ``every_s`` seconds."""
    shown = time.monotonic()
    while True:
        status = daemon.status()
        if status["queue_depth"] == 0:
            return dict(status["edits"])
        if time.monotonic() - shown >= every_s:
            shown = time.monotonic()
            done = total - status["queue_depth"]
            print(f"  {time.perf_counter() - t0:7.1f} s  {done}/{total} settled", flush=True)
        time.sleep(0.2)


def build(cfg: Config, requests: list[dict[str, Any]], write_repeat: int) -> dict[str, Any]:
    """Apply ``requests`` through a daemon: checkpoint at 90% and at 100% (and time
    ``write_repeat`` more writes of the full state, marked bad once written)."""
    daemon = Daemon(cfg)
    daemon.start()
    cut = len(requests) - len(requests) // 10
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        for name, part in (("ck90", requests[:cut]), ("ck100", requests[cut:])):
            daemon.submit(part)
            counts = _wait_idle(daemon, len(requests), t0)
            t_ck = time.perf_counter()
            record = daemon.checkpoint(f"bench-{name}")
            assert record is not None
            out[name] = {
                "id": record.id,
                "edit_count": record.edit_count,
                "write_s": round(time.perf_counter() - t_ck, 3),
                "mb": round(_folder_bytes(Path(record.path)) / 2**20, 2),
            }
        out["apply_s"] = round(time.perf_counter() - t0, 1)
        out["extra_writes_s"] = _extra_writes(daemon, cfg, write_repeat)
        writes = [out["ck100"]["write_s"], *out["extra_writes_s"]]
        out["write_s_median"] = statistics.median(writes)
        out["edits"] = counts
        out["applied_by_backend"] = daemon.status()["applied_by_backend"]
    finally:
        daemon.stop(checkpoint=False)
    return out


def _extra_writes(daemon: Daemon, cfg: Config, repeat: int) -> list[float]:
    """Seconds of ``repeat`` more checkpoints of the full state, each marked bad at once."""
    seconds = []
    for k in range(repeat):
        t0 = time.perf_counter()
        record = daemon.checkpoint(f"bench-write-{k}")
        seconds.append(round(time.perf_counter() - t0, 3))
        assert record is not None
        with Store.open(cfg.store.path, create=False) as st:
            mark_bad(st, record.id, note="bench: write timing only")
    return seconds


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_start(cfg: Config) -> dict[str, Any]:
    """``Daemon(cfg).start()`` once: total and restore seconds, what the restore did."""
    daemon = Daemon(cfg)
    t0 = time.perf_counter()
    daemon.start()
    total = time.perf_counter() - t0
    try:
        report = daemon.restore_report
        assert report is not None
        return {
            "start_s": round(total, 3),
            "restore_s": report.seconds,
            "checkpoint_id": report.checkpoint_id,
            "from_checkpoint": report.from_checkpoint,
            "replayed": report.reconcile.replayed,
            "replay_failed": len(report.reconcile.failed),
            "applied_after": daemon.status()["edits"]["applied"],
        }
    finally:
        daemon.stop(checkpoint=False)


def measure(
    cfg: Config, built: dict[str, Any], repeat: int, full_replay: bool = True
) -> dict[str, dict[str, Any]]:
    runs = [timed_start(cfg) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["start_s"])
    a = {**best, "runs": len(runs), "start_s_median": statistics.median(r["start_s"] for r in runs)}
    a["restore_s_median"] = statistics.median(r["restore_s"] for r in runs)
    store = cfg.store.path
    with Store.open(store, create=False) as st:
        mark_bad(st, built["ck100"]["id"], note="bench: force the 90% checkpoint")
    c = timed_start(cfg)
    if not full_replay:
        return {"checkpoint_all": a, "checkpoint_90_replay_10": c}
    with Store.open(store, create=False) as st:
        for record in list_checkpoints(st, status="good"):
            mark_bad(st, record.id, note="bench: force a full replay")
    b = timed_start(cfg)
    return {"checkpoint_all": a, "full_replay": b, "checkpoint_90_replay_10": c}


def print_table(result: dict[str, Any]) -> None:
    n = result["n_edits"]
    runs = result["restarts"]
    rows = [
        (f"(a) checkpoint with all {n} edits", runs["checkpoint_all"]),
        (f"(b) no checkpoint: replay all {n}", runs.get("full_replay")),
        ("(c) checkpoint at 90% + replay last 10%", runs["checkpoint_90_replay_10"]),
    ]
    print(f"\nrestart with {n} applied edits ({result['model']}, {'+'.join(result['backends'])})")
    print(f"{'restart':<42} {'start s':>8} {'restore s':>10} {'from ck':>8} {'replayed':>9}")
    for name, r in rows:
        if r is None:
            print(f"{name:<42} {'(skipped)':>8}")
            continue
        print(
            f"{name:<42} {r['start_s']:>8.2f} {r['restore_s']:>10.2f} "
            f"{r['from_checkpoint']:>8} {r['replayed']:>9}"
        )
    b = result["build"]
    print(f"\nbuild: {b['apply_s']} s to apply {n} edits ({b['apply_s'] / n:.2f} s per edit)")
    print(f"{'checkpoint write':<42} {'edits':>6} {'MB':>8} {'write s':>8}")
    for name in ("ck90", "ck100"):
        ck = b[name]
        print(f"{name:<42} {ck['edit_count']:>6} {ck['mb']:>8.2f} {ck['write_s']:>8.3f}")
    writes = len(b["extra_writes_s"]) + 1
    print(f"{f'full state, median of {writes}':<42} {'':>6} {'':>8} {b['write_s_median']:>8.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--edits", type=Path, default=DEFAULT_EDITS)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--backends", default="melo", help="comma list: melo | hook,melo")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--hook-layers", default="2,3", help="[editors.hook] layers (BENCHMARKS)")
    parser.add_argument("--hook-key-position", default="prompt_last")
    parser.add_argument("--repeat", type=int, default=3, help="runs of restart (a)")
    parser.add_argument("--write-repeat", type=int, default=2, help="extra timed checkpoints")
    parser.add_argument("--skip-full-replay", action="store_true", help="leave out restart (b)")
    parser.add_argument("--work", type=Path, default=None, help="state folder (recreated)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    torch.set_num_threads(1)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    model_name = args.model.name
    tag = f"{model_name}-{args.n}" + ("" if backends == ["melo"] else "-" + "+".join(backends))
    work = args.work or REPO / "var" / "bench" / f"restore-{tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if "hook" in backends and (REPO / "var" / "stats").is_dir():
        (work / "stats").symlink_to(REPO / "var" / "stats")  # hook covariance cache
    requests = edit_pool(args.edits, args.n, args.model)
    for r in requests:
        r["backend"] = "auto" if len(backends) > 1 else backends[0]
    hook = {
        "layers": [int(x) for x in args.hook_layers.split(",") if x.strip()],
        "key_position": args.hook_key_position,
    }
    cfg = bench_config(work, args.model, backends, args.batch_size, hook)
    print(f"building a store with {args.n} edits in {work} ...", flush=True)
    built = build(cfg, requests, args.write_repeat)
    print("restarting ...", flush=True)
    restarts = measure(cfg, built, args.repeat, full_replay=not args.skip_full_replay)
    result = {
        "benchmark": "restore",
        "model": model_name,
        "backends": backends,
        "n_edits": args.n,
        "batch_size": args.batch_size,
        "hook": hook if "hook" in backends else None,
        "build": built,
        "restarts": restarts,
        "machine": {
            "cpus_torch_threads": 1,
            "platform": platform.platform(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join([".venv/bin/python -m bench.restore", *argv]),
    }
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"restore-{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
