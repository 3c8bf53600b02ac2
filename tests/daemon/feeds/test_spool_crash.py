"""The spool import killed with SIGKILL at random moments: every line lands exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from store import editlog
from store.db import Store
from store.spool import SpoolFileStatus, list_spool_files

REPO_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def make_spool(spool: Path, files: int, lines: int) -> dict[str, int]:
    """``files`` files of ``lines`` distinct edits each, dropped in incoming/."""
    incoming = spool / "incoming"
    incoming.mkdir(parents=True)
    names = {}
    for f in range(files):
        name = f"drop-{f:02d}.jsonl"
        body = "".join(
            json.dumps({"prompt": f"Fact {f}-{i} is", "target": f" value {f}-{i}"}) + "\n"
            for i in range(lines)
        )
        (incoming / f".{name}.part").write_text(body)
        (incoming / f".{name}.part").rename(incoming / name)
        names[name] = lines
    return names


def start(
    db: Path, spool: Path, ready: Path, pause_s: float = 0.0, chunk_lines: int = 1000
) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    args = [str(db), str(spool), str(ready), str(pause_s), str(chunk_lines)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.daemon.feeds._spool_import", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
    )


def kill_at_random(
    db: Path,
    spool: Path,
    tmp: Path,
    rng: random.Random,
    max_delay: float,
    pause_s: float,
    chunk_lines: int,
) -> bool:
    """Start an import, wait until its store is open, SIGKILL it after a random delay.

    ``True`` if it was still running when killed.
    """
    ready = tmp / "ready"
    proc = start(db, spool, ready, pause_s, chunk_lines)
    deadline = time.monotonic() + 30
    while not ready.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the importer did not start"
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive or proc.returncode == 0, err.decode(errors="replace")
    return alive


def check_exactly_once(db: Path, spool: Path, names: dict[str, int]) -> None:
    """Every line of every file is one edit; every file is processed with its report."""
    with Store.open(db, create=False) as store:
        assert store.integrity_check() == "ok"
        with store.read() as conn:
            rows = conn.execute("SELECT id, request_json, status FROM edits").fetchall()
        enqueued = editlog.events(store, kind="edit_enqueued", limit=1_000_000)
        files = list_spool_files(store, limit=-1)
    total = sum(names.values())
    sources: Counter[tuple[str, int]] = Counter()
    for _, request_json, status in rows:
        assert status == "queued"
        source = json.loads(request_json)["source"]
        sources[(source["url"], int(source["item_id"]))] += 1
    expected = {(name, line) for name, n in names.items() for line in range(1, n + 1)}
    assert set(sources) == expected and set(sources.values()) == {1}
    assert len(rows) == total
    assert len(enqueued) == total and len({e.edit_id for e in enqueued}) == total
    assert sorted(f.name for f in files) == sorted(names)
    assert {f.status for f in files} == {SpoolFileStatus.PROCESSED}
    assert not [p for p in (spool / "incoming").iterdir() if not p.name.startswith(".")]
    moved = sorted(p.name for p in (spool / "processed").glob("*.jsonl"))
    assert moved == sorted(names)
    by_file: dict[str, set[str]] = {}
    for edit_id, request_json, _ in rows:
        by_file.setdefault(json.loads(request_json)["source"]["url"], set()).add(edit_id)
    for name, lines in names.items():
        report = json.loads((spool / "processed" / f"{name}.report.json").read_text())
        assert (report["status"], report["accepted"], report["lines"]) == (
            "processed",
            lines,
            lines,
        )
        assert set(report["edit_ids"]) == by_file[name]


def crash_repeatedly(
    tmp: Path,
    *,
    files: int,
    lines: int,
    kills: int,
    seed: int,
    pause_s: float = 0.05,
    chunk_lines: int = 1000,
) -> int:
    db, spool = tmp / "editd.sqlite3", tmp / "spool"
    Store.open(db).close()  # migrated once, so the killed runs start importing at once
    names = make_spool(spool, files, lines)
    rng = random.Random(seed)
    interrupted = sum(
        kill_at_random(db, spool, tmp, rng, 0.4, pause_s, chunk_lines) for _ in range(kills)
    )
    proc = start(db, spool, tmp / "ready", chunk_lines=chunk_lines)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode(errors="replace")
    check_exactly_once(db, spool, names)
    return interrupted


def test_sigkill_during_import_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """8 files x 500 lines, the importer killed 8 times at seeded random moments (some
    between a file's commit and its move), then run to completion: no line lost, none
    imported twice, every file moved once with its report."""
    interrupted = crash_repeatedly(tmp_path, files=8, lines=500, kills=8, seed=7)
    assert interrupted >= 1


def test_sigkill_mid_file_resumes_after_the_last_chunk(tmp_path: Path) -> None:
    """4 files x 500 lines imported 40 lines per transaction, killed 8 times (mostly in
    the middle of a file): each run resumes after the last committed chunk, and every
    line still lands exactly once."""
    interrupted = crash_repeatedly(
        tmp_path, files=4, lines=500, kills=8, seed=5, pause_s=0.0, chunk_lines=40
    )
    assert interrupted >= 1


@pytest.mark.slow
def test_sigkill_many_times_on_a_larger_spool(tmp_path: Path) -> None:
    """The same with 20 files x 2,000 lines and 25 kills."""
    interrupted = crash_repeatedly(tmp_path, files=20, lines=2000, kills=25, seed=11)
    assert interrupted >= 5
