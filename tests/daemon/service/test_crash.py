"""Crash safety: kill -9 the daemon at random moments while 200 edits flow.

After the last restart every edit is applied exactly once or still queued (here:
settled as applied or failed, since the last run is left to finish), none is
lost or doubled, and the model answers every edit prompt the way an uncrashed
daemon given the same edits does. "Answers" is the first word of the greedy
continuation: the text after it may differ, because which edits share a batch
depends on timing and the hook back-end optimises a batch's targets jointly.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.service.daemon import Daemon
from tests.daemon.service.conftest import DaemonProcess, write_config

KILLS = 10
TIME_BOUND_S = 900.0
SETTINGS: dict[str, dict[str, Any]] = {
    "checkpoints": {"every_edits": 24, "keep": 3},
    "worker": {"batch_size": 8, "max_wait_s": 0.1, "poll_interval_s": 0.05},
    "scheduler": {"enabled": False},
}


def _answers_in_process(config: Path, prompts: list[str]) -> list[str]:
    daemon = Daemon(load_config(config))
    daemon.start()
    try:
        assert daemon.engine is not None
        return daemon.engine.greedy(prompts, 4)
    finally:
        daemon.stop(checkpoint=False)


def _reference_run(
    micro_world: Path, edits: list[dict[str, Any]], folder: Path
) -> tuple[dict[str, str], list[str]]:
    config = write_config(folder, micro_world, **SETTINGS)
    daemon = Daemon(load_config(config))
    daemon.start()
    try:
        daemon.submit(edits)
        assert daemon.queue is not None
        deadline = time.monotonic() + TIME_BOUND_S
        while daemon.queue.depth() and time.monotonic() < deadline:
            time.sleep(0.2)
        states = {e["id"]: daemon.get_edit(e["id"]).status.value for e in edits}
        assert daemon.engine is not None
        answers = daemon.engine.greedy([e["prompt"] for e in edits], 4)
    finally:
        daemon.stop(checkpoint=False)
    return states, answers


def _answer(continuation: str) -> str:
    words = re.findall(r"\w+", continuation)
    return words[0] if words else ""


def _applied_events(store: Path) -> dict[str, int]:
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT edit_id, COUNT(*) FROM events WHERE kind = 'edit_applied' GROUP BY edit_id"
        ).fetchall()
    return {str(e): int(n) for e, n in rows}


@pytest.mark.parametrize(
    "n_edits",
    [pytest.param(40, id="40-edits"), pytest.param(200, id="200-edits", marks=pytest.mark.slow)],
)
def test_kill_9_at_random_moments_loses_and_doubles_nothing(
    n_edits: int,
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
) -> None:
    rng = random.Random(7)
    edits = [dict(e) for e in world_edits[:n_edits]]
    per_run = max(4, n_edits // 8)
    for e in edits[::3]:
        e["backend"] = "melo"
    config = write_config(tmp_path / "crashed", micro_world, **SETTINGS)
    started = time.monotonic()
    sent = 0
    for kill in range(KILLS):
        daemon = DaemonProcess(config)
        daemon_factory.append(daemon)
        daemon.start()
        # resubmitting what may already be stored is idempotent by id
        upto = min(len(edits), sent + rng.randint(per_run // 2, per_run * 2))
        daemon.submit(edits[max(0, sent - 5) : upto])
        sent = upto
        time.sleep(rng.uniform(0.2, 2.5 if n_edits > 100 else 1.2))
        daemon.kill()
        assert time.monotonic() - started < TIME_BOUND_S, f"too slow after {kill + 1} kills"
    final = DaemonProcess(config)
    daemon_factory.append(final)
    final.start()
    final.submit(edits)  # the rest (and the already-stored ones again: no duplicates)
    states = final.wait_settled([e["id"] for e in edits], timeout=TIME_BOUND_S)
    assert final.terminate() == 0

    assert set(states.values()) <= {"applied", "failed"}, states
    store = tmp_path / "crashed" / "var" / "editd.sqlite3"
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM edits").fetchone()[0] == len(edits)
    applied_events = _applied_events(store)
    assert all(n == 1 for n in applied_events.values()), applied_events
    assert {e for e, s in states.items() if s == "applied"} == set(applied_events)

    crashed_answers = _answers_in_process(config, [e["prompt"] for e in edits])
    ref_states, ref_answers = _reference_run(micro_world, edits, tmp_path / "reference")
    assert states == ref_states
    mismatched = [
        (e["prompt"], a, b)
        for e, a, b in zip(edits, crashed_answers, ref_answers, strict=True)
        if _answer(a) != _answer(b)
    ]
    assert not mismatched, json.dumps(mismatched[:5])
