"""Spool file rows and nightly run rows: round trips, finishing, listing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.errors import RecordNotFoundError, StoreError
from store.db import Store
from store.queue import EditQueue
from store.schema import Schedule
from store.spool import (
    NightlyRunStatus,
    RejectedLine,
    SpoolFileReport,
    SpoolFileStatus,
    edit_status_counts,
    fail_interrupted_runs,
    finish_nightly_run,
    finish_spool_file,
    get_nightly_run,
    get_spool_file,
    latest_nightly_run,
    list_nightly_runs,
    list_spool_files,
    queued_edit_ids,
    record_spool_import,
    start_nightly_run,
)
from tests.store.helpers import FakeClock, request

SHA_A, SHA_B = "a" * 64, "b" * 64


def _record(store: Store, sha: str, name: str, run_id: int | None = None) -> None:
    report = SpoolFileReport(
        name=name,
        sha256=sha,
        status="processed",
        destination=Path(f"processed/{name}"),
        lines=3,
        accepted=1,
        rejected=(RejectedLine(2, "ü", "e2"),),
        duplicates=1,
        edit_ids=("e1", "e3"),
    )
    record_spool_import(store, report, run_id=run_id)


def test_spool_file_round_trip(store: Store, clock: FakeClock) -> None:
    """A recorded import reads back field for field, then finishes with a new report."""
    run_id = start_nightly_run(store, "cli")
    _record(store, SHA_A, "a.jsonl", run_id)
    row = get_spool_file(store, SHA_A)
    assert row is not None
    assert (row.name, row.status, row.run_id) == ("a.jsonl", SpoolFileStatus.IMPORTED, run_id)
    assert (row.lines, row.accepted, row.rejected, row.duplicates) == (3, 1, 1, 1)
    assert row.report["destination"] == "processed/a.jsonl"
    assert row.report["rejected_lines"] == [{"line": 2, "reason": "ü", "edit_id": "e2"}]
    assert SpoolFileReport.from_json_dict(row.report).edit_ids == ("e1", "e3")
    assert row.imported_at == clock.now and row.finished_at is None
    clock.advance(5)
    done = finish_spool_file(store, SHA_A, "processed", report={"x": 1})
    assert done.status is SpoolFileStatus.PROCESSED and done.finished_at == clock.now
    assert done.report == {"x": 1}
    kept = finish_spool_file(store, SHA_A, SpoolFileStatus.REJECTED)
    assert kept.report == {"x": 1} and kept.status is SpoolFileStatus.REJECTED
    assert json.loads(json.dumps(done.to_json_dict()))["status"] == "processed"


def test_spool_file_is_recorded_once(store: Store) -> None:
    """The same content cannot be recorded twice; bad input is refused."""
    _record(store, SHA_A, "a.jsonl")
    with pytest.raises(StoreError, match="already imported"):
        _record(store, SHA_A, "other.jsonl")
    with pytest.raises(ValueError, match="sha256"):
        _record(store, "A" * 64, "x.jsonl")
    with pytest.raises(ValueError, match="finished as"):
        finish_spool_file(store, SHA_A, "imported")
    with pytest.raises(RecordNotFoundError):
        finish_spool_file(store, SHA_B, "processed")
    assert get_spool_file(store, SHA_B) is None


def test_list_spool_files(store: Store, clock: FakeClock) -> None:
    """Newest first, filtered by status, limited (-1: all)."""
    _record(store, SHA_A, "a.jsonl")
    clock.advance(1)
    _record(store, SHA_B, "b.jsonl")
    finish_spool_file(store, SHA_A, "processed")
    assert [f.name for f in list_spool_files(store)] == ["b.jsonl", "a.jsonl"]
    assert [f.name for f in list_spool_files(store, status="imported")] == ["b.jsonl"]
    assert [f.name for f in list_spool_files(store, limit=1)] == ["b.jsonl"]
    assert len(list_spool_files(store, limit=-1)) == 2


def test_nightly_runs(store: Store, clock: FakeClock) -> None:
    """A run starts running, finishes once with its summary; latest and list are newest first."""
    assert latest_nightly_run(store) is None
    first = start_nightly_run(store, "scheduler")
    clock.advance(10)
    second = start_nightly_run(store, "cli")
    assert second > first
    run = get_nightly_run(store, first)
    assert (run.trigger, run.status, run.started_at) == ("scheduler", "running", clock.now - 10)
    clock.advance(1)
    done = finish_nightly_run(store, first, "done", {"released": 2, "drift": {"status": "passed"}})
    assert done.status is NightlyRunStatus.DONE and done.finished_at == clock.now
    assert done.summary == {"released": 2, "drift": {"status": "passed"}}
    latest = latest_nightly_run(store)
    assert latest is not None and latest.id == second
    assert [r.id for r in list_nightly_runs(store)] == [second, first]
    assert done.to_json_dict()["status"] == "done"


def test_nightly_run_errors(store: Store) -> None:
    """Unknown ids raise RecordNotFoundError; a run cannot be finished as running."""
    with pytest.raises(RecordNotFoundError):
        get_nightly_run(store, 42)
    with pytest.raises(RecordNotFoundError):
        finish_nightly_run(store, 42, "failed", {})
    run_id = start_nightly_run(store, "cli")
    with pytest.raises(ValueError):
        finish_nightly_run(store, run_id, "running", {})
    with pytest.raises(ValueError):
        start_nightly_run(store, " ")


def test_edit_helpers(store: Store, queue: EditQueue) -> None:
    """Held nightly ids in queue order; status counts over many ids (chunked queries)."""
    now = queue.submit_many([request(i) for i in range(3)])
    nightly = queue.submit_many([request(10 + i, schedule="nightly") for i in range(2)])
    assert queued_edit_ids(store, Schedule.NIGHTLY) == [r.id for r in nightly]
    counts = edit_status_counts(store, [r.id for r in now + nightly] + ["x"] * 1200)
    assert counts["queued"] == 5 and sum(counts.values()) == 5


def test_report_round_trip() -> None:
    """A report survives its JSON form; the short form drops the per-line lists."""
    report = SpoolFileReport(
        name="a.jsonl",
        sha256=SHA_A,
        status="processed",
        destination=Path("processed/a.jsonl"),
        lines=3,
        accepted=1,
        rejected=(RejectedLine(2, "bad", "e2"),),
        duplicates=1,
        edit_ids=("e1", "e3"),
        extra={"bytes": 10, "run_id": None},
    )
    data = json.loads(json.dumps(report.to_json_dict()))
    assert data["rejected"] == 1 and data["rejected_lines"][0]["line"] == 2
    assert SpoolFileReport.from_json_dict(data) == report
    short = report.short_json()
    assert "edit_ids" not in short and short["resumed"] is False and short["rejected"] == 1


def test_interrupted_runs_are_closed_as_failed(store: Store) -> None:
    """Only ``running`` rows with the given triggers are closed; the reason is kept."""
    daemon_run = start_nightly_run(store, "schedule")
    finish_nightly_run(store, daemon_run, "done", {"released": 1})
    crashed = start_nightly_run(store, "api")
    offline = start_nightly_run(store, "cli")
    assert fail_interrupted_runs(store, ("schedule", "api"), "interrupted") == 1
    closed = get_nightly_run(store, crashed)
    assert closed.status.value == "failed" and closed.summary["error"] == "interrupted"
    assert get_nightly_run(store, offline).status.value == "running"
    assert get_nightly_run(store, daemon_run).status.value == "done"
    assert fail_interrupted_runs(store, ("schedule", "api"), "interrupted") == 0


def test_a_version_6_store_keeps_its_spool_rows_through_the_chunked_import_migration(
    tmp_path: Path,
) -> None:
    """Migration 7 rebuilds spool_files (a new status): rows written under version 6
    survive with every column, and the new status and progress column work after it."""
    from sqlite_utils import Database

    from store import migrations
    from store.db import _connect

    path = tmp_path / "old.sqlite3"
    old = Store(Database(_connect(path, True), execute_plugins=False), path, FakeClock())
    old._configure()
    assert migrations.migrate(old, migrations.MIGRATIONS[:6])[-1] == "feed_items_and_spool"
    with old.write():
        old.db.execute(
            "INSERT INTO spool_files (sha256, name, status, lines, accepted, rejected, "
            "duplicates, report, imported_at, finished_at) "
            "VALUES (?, 'a.jsonl', 'processed', 3, 2, 1, 0, '{\"x\": 1}', 10.0, 11.0)",
            [SHA_A],
        )
    old.close()

    store = Store.open(path)
    assert migrations.current_version(store.db) == migrations.MIGRATIONS[-1].version
    row = store.db.execute(
        "SELECT name, status, lines, accepted, rejected, report, imported_at, finished_at, "
        "lines_done FROM spool_files WHERE sha256 = ?",
        [SHA_A],
    ).fetchone()
    assert row == ("a.jsonl", "processed", 3, 2, 1, '{"x": 1}', 10.0, 11.0, 0)
    kept = get_spool_file(store, SHA_A)
    assert kept is not None and kept.status is SpoolFileStatus.PROCESSED
    with store.write():
        store.db.execute(
            "INSERT INTO spool_files (sha256, name, status, imported_at) "
            "VALUES (?, 'b.jsonl', 'importing', 12.0)",
            [SHA_B],
        )
    store.close()
