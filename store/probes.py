"""Probe runs: drift and locality measurements, with a pass/fail verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from store import editlog
from store.db import Store
from store.editlog import EventKind


@dataclass(frozen=True)
class ProbeRun:
    """One row of ``probe_runs``."""

    id: int
    ts: float
    kind: str
    metrics: dict[str, Any]
    passed: bool
    checkpoint_id: str | None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "metrics": self.metrics,
            "passed": self.passed,
            "checkpoint_id": self.checkpoint_id,
        }


def record_probe_run(
    store: Store,
    kind: str,
    metrics: dict[str, Any],
    passed: bool,
    *,
    checkpoint_id: str | None = None,
) -> ProbeRun:
    """Store the metrics of one probe run (e.g. ``kind="drift"``) and its verdict."""
    if not kind:
        raise ValueError("probe run kind must not be empty")
    with store.write() as db:
        cursor = db.execute(
            "INSERT INTO probe_runs (ts, kind, metrics, passed, checkpoint_id) "
            "VALUES (?, ?, ?, ?, ?)",
            [store.now(), kind, json.dumps(metrics, sort_keys=True), int(passed), checkpoint_id],
        )
        run_id = int(cursor.lastrowid or 0)
        data = {"id": run_id, "kind": kind, "passed": passed}
        editlog.append(store, EventKind.PROBE_RUN_RECORDED, data=data)
        return _select(store, "id = ?", [run_id])[0]


def latest_probe_run(store: Store, kind: str | None = None) -> ProbeRun | None:
    """The newest probe run, optionally of one ``kind``."""
    found = _select(store, "1 = 1", []) if kind is None else _select(store, "kind = ?", [kind])
    return found[0] if found else None


def _select(store: Store, where: str, params: list[Any]) -> list[ProbeRun]:
    sql = f"SELECT * FROM probe_runs WHERE {where} ORDER BY id DESC LIMIT 1"
    with store.read() as db:
        rows = list(db.query(sql, params))
    return [
        ProbeRun(
            id=int(row["id"]),
            ts=float(row["ts"]),
            kind=row["kind"],
            metrics=json.loads(row["metrics"]),
            passed=bool(row["passed"]),
            checkpoint_id=row["checkpoint_id"],
        )
        for row in rows
    ]
