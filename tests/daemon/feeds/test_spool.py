"""The spool import: reports, rejected files and lines, duplicates, collisions, crashes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import daemon.feeds.spool as spool_mod
from daemon.feeds.spool import SpoolImport, import_spool
from store import editlog
from store.db import Store
from store.queue import EditQueue
from store.schema import RequestLimits
from store.spool import SpoolFileStatus, get_spool_file, list_spool_files

LIMITS = RequestLimits()


class SimulatedCrash(BaseException):
    """Stands for the process dying (a BaseException: nothing catches it)."""


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "var" / "editd.sqlite3") as st:
        yield st


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    (path / "incoming").mkdir(parents=True)
    return path


def edit(n: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": f"The capital of Zorbia{n} is", "target": f" Qux{n}", **extra}


def drop(spool: Path, name: str, lines: list[Any] | bytes) -> Path:
    """Write a file the way writers should: a temp name, then a rename into incoming/."""
    data = (
        lines
        if isinstance(lines, bytes)
        else "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    )
    tmp = spool / "incoming" / f".{name}.tmp"
    tmp.write_bytes(data)
    final = spool / "incoming" / name
    tmp.rename(final)
    return final


def run(
    db: Store, spool: Path, max_file_bytes: int = 1 << 20, chunk_lines: int = 1000
) -> SpoolImport:
    return import_spool(
        db, spool, limits=LIMITS, max_file_bytes=max_file_bytes, chunk_lines=chunk_lines
    )


def report_file(spool: Path, destination: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((spool / f"{destination}.report.json").read_text())
    return data


def edit_count(db: Store) -> int:
    with db.read() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM edits").fetchone()[0])


def test_good_file_is_processed_with_a_report(db: Store, spool: Path) -> None:
    """Every line becomes a queued edit whose source names the file and line; the file
    moves to processed/ beside its report, and the row is processed."""
    drop(spool, "batch one.jsonl", [edit(i) for i in range(3)])
    with capture_logs() as logs:
        result = run(db, spool)
    (report,) = result.files
    assert (report.status, report.lines, report.accepted, report.rejected) == (
        "processed",
        3,
        3,
        (),
    )
    assert report.destination == Path("processed/batch one.jsonl")
    assert not list((spool / "incoming").iterdir())
    assert (spool / "processed" / "batch one.jsonl").is_file()
    on_disk = report_file(spool, "processed/batch one.jsonl")
    row = get_spool_file(db, report.sha256)
    assert row is not None and row.status is SpoolFileStatus.PROCESSED
    assert on_disk == row.report and on_disk["edit_ids"] == list(report.edit_ids)
    queue = EditQueue(db)
    for line, edit_id in enumerate(report.edit_ids, start=1):
        record = queue.get(edit_id)
        assert record.status == "queued" and record.source_kind == "spool"
        assert record.request is not None
        source = record.request.source.to_json_dict()
        assert source == {"kind": "spool", "url": "batch%20one.jsonl", "item_id": str(line)}
    events = [e["event"] for e in logs]
    assert "spool_file_imported" in events and "spool_imported" in events
    assert result.totals["accepted"] == 3 and result.edit_ids() == list(report.edit_ids)


def test_bad_lines_are_rejected_edits_with_line_numbers(db: Store, spool: Path) -> None:
    """Invalid lines become rejected edits with their reasons, listed by line number;
    blank lines are skipped; a line with its own source keeps it."""
    own = {"kind": "feed", "url": "https://example.org/x", "item_id": "7"}
    lines = [
        edit(1),
        "",
        "not json",
        "[1, 2]",
        {"prompt": "no target"},
        '{"prompt": "a", "prompt": "b", "target": " c"}',
        edit(2, source=own),
        "   ",
    ]
    drop(spool, "mixed.jsonl", lines)
    (report,) = run(db, spool).files
    assert report.status == "processed" and report.lines == 6 and report.accepted == 2
    assert [r.line for r in report.rejected] == [3, 4, 5, 6]
    queue = EditQueue(db)
    for rejected in report.rejected:
        assert rejected.edit_id is not None
        record = queue.get(rejected.edit_id)
        assert record.status == "rejected" and record.error == rejected.reason
    reasons = [r.reason for r in report.rejected]
    assert "mixed.jsonl, record 3: invalid JSON" in reasons[0]
    assert "must be a JSON object" in reasons[1] and "record 4" in reasons[1]
    assert "target" in reasons[2] and "duplicate field" in reasons[3]
    own_record = queue.get(report.edit_ids[1])
    assert own_record.request is not None and own_record.request.source.to_json_dict() == own
    assert report_file(spool, "processed/mixed.jsonl")["rejected_lines"][0]["line"] == 3


def test_lines_whose_edits_exist_are_duplicates(db: Store, spool: Path) -> None:
    """A line repeating a live edit's content or an id already used points at that edit."""
    existing = EditQueue(db).submit_many([edit(1), edit(2, id="client-2")])
    drop(spool, "dups.jsonl", [edit(1), edit(2, id="client-2"), edit(3)])
    (report,) = run(db, spool).files
    assert (report.accepted, report.duplicates) == (1, 2)
    assert list(report.edit_ids[:2]) == [r.id for r in existing]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"prompt": "caf\xe9 is", "target": " x"}\n', "not valid UTF-8 (at byte 15)"),
        (b"nope\n[]\n\n", "no valid edit line"),
        (b"\n\n", "no edit lines"),
        (b"", "no edit lines"),
        (json.dumps(edit(1)).encode() * 40, "file is too large"),
    ],
    ids=["latin-1", "all-bad", "blank", "empty", "oversize"],
)
def test_rejected_files(db: Store, spool: Path, data: bytes, reason: str) -> None:
    """Not UTF-8, no valid line, too large: moved to rejected/, nothing stored but the row."""
    drop(spool, "bad.jsonl", data)
    with capture_logs() as logs:
        (report,) = run(db, spool, max_file_bytes=1000).files
    assert report.status == "rejected" and report.reason is not None
    assert report.reason.startswith(reason)
    assert (spool / "rejected" / "bad.jsonl").read_bytes() == data
    assert report_file(spool, "rejected/bad.jsonl")["reason"] == report.reason
    assert edit_count(db) == 0 and report.edit_ids == ()
    assert all(r.edit_id is None for r in report.rejected)
    row = get_spool_file(db, report.sha256)
    assert row is not None and row.status is SpoolFileStatus.REJECTED
    assert any(e["event"] == "spool_file_rejected" for e in logs)


def test_a_line_over_the_size_limit_is_rejected(db: Store, spool: Path) -> None:
    """A line longer than max_request_bytes is a rejected line; the next line still counts."""
    huge = json.dumps(edit(1, rephrases=["x" * 300_000]))
    drop(spool, "big.jsonl", [huge, edit(2)])
    (report,) = run(db, spool).files
    assert report.accepted == 1 and report.rejected[0].line == 1
    assert "line is too large" in report.rejected[0].reason


def test_temporary_and_other_names_are_ignored(db: Store, spool: Path) -> None:
    """Hidden, .tmp, .part, non-.jsonl files, folders and symlinks stay where they are."""
    incoming = spool / "incoming"
    for name in (".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part", "notes.txt"):
        (incoming / name).write_text(json.dumps(edit(1)) + "\n")
    (incoming / "folder.jsonl").mkdir()
    target = drop(spool, "real.jsonl", [edit(2)])
    (incoming / "link.jsonl").symlink_to(target)
    result = run(db, spool)
    assert [f.name for f in result.files] == ["real.jsonl"]
    left = sorted(p.name for p in incoming.iterdir())
    expected = [".hidden.jsonl", "folder.jsonl", "link.jsonl", "notes.txt"]
    assert left == sorted([*expected, "x.jsonl.tmp", "y.jsonl.part"])


def test_files_are_imported_in_name_order(db: Store, spool: Path) -> None:
    """Files are read in name order, so their edits queue in that order."""
    for name, n in (("b.jsonl", 2), ("a.jsonl", 1), ("c.jsonl", 3)):
        drop(spool, name, [edit(n)])
    result = run(db, spool)
    assert [f.name for f in result.files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [r.id for r in EditQueue(db).list()] == result.edit_ids()


def test_same_content_again_is_a_duplicate(db: Store, spool: Path) -> None:
    """Content imported before (any name, same or later run) is not imported again."""
    drop(spool, "a.jsonl", [edit(1), edit(2)])
    drop(spool, "b.jsonl", [edit(1), edit(2)])
    first = run(db, spool)
    assert [f.status for f in first.files] == ["processed", "duplicate"]
    drop(spool, "a.jsonl", [edit(1), edit(2)])
    with capture_logs() as logs:
        (again,) = run(db, spool).files
    assert again.status == "duplicate" and again.duplicate_of is not None
    assert again.duplicate_of["name"] == "a.jsonl" and again.duplicate_of["status"] == "processed"
    assert again.destination.parent == Path("processed") and again.destination.name != "a.jsonl"
    assert report_file(spool, again.destination.as_posix())["status"] == "duplicate"
    assert edit_count(db) == 2 and len(list_spool_files(db)) == 1
    assert any(e["event"] == "spool_file_duplicate" for e in logs)


def test_name_collisions_never_overwrite(db: Store, spool: Path) -> None:
    """A second file with a taken name gets a short sha suffix; both files are kept."""
    drop(spool, "daily.jsonl", [edit(1)])
    (first,) = run(db, spool).files
    drop(spool, "daily.jsonl", [edit(2)])
    (second,) = run(db, spool).files
    assert first.destination == Path("processed/daily.jsonl")
    assert second.destination == Path(f"processed/daily.{second.sha256[:8]}.jsonl")
    assert json.loads((spool / "processed/daily.jsonl").read_text()) == edit(1)
    assert json.loads((spool / second.destination).read_text()) == edit(2)
    assert report_file(spool, "processed/daily.jsonl")["sha256"] == first.sha256


def test_crash_after_commit_before_move(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edits and row committed, the process died before the move: the next run only
    moves the file and writes the report, importing nothing again."""
    drop(spool, "a.jsonl", [edit(1), edit(2)])

    def die(src: Path, dest: Path) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(spool_mod, "_move", die)
    with pytest.raises(SimulatedCrash):
        run(db, spool)
    (row,) = list_spool_files(db)
    assert row.status is SpoolFileStatus.IMPORTED and edit_count(db) == 2
    assert (spool / "incoming" / "a.jsonl").exists()
    monkeypatch.undo()
    events_before = editlog.last_event_id(db)
    (report,) = run(db, spool).files
    assert report.resumed and report.status == "processed" and report.accepted == 2
    assert edit_count(db) == 2 and editlog.last_event_id(db) == events_before
    assert (spool / "processed" / "a.jsonl").exists()
    assert report_file(spool, "processed/a.jsonl")["edit_ids"] == list(report.edit_ids)
    finished = get_spool_file(db, row.sha256)
    assert finished is not None and finished.status is SpoolFileStatus.PROCESSED


def test_crash_after_move_before_the_row_is_marked(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file already moved but the row still says imported: the next run marks it,
    even with a new file of the same name waiting in incoming/."""
    drop(spool, "a.jsonl", [edit(1)])

    def die(*args: object, **kwargs: object) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(spool_mod, "finish_spool_file", die)
    with pytest.raises(SimulatedCrash):
        run(db, spool)
    monkeypatch.undo()
    (row,) = list_spool_files(db)
    assert row.status is SpoolFileStatus.IMPORTED  # the finishing transaction rolled back
    assert (spool / "processed" / "a.jsonl").exists()
    drop(spool, "a.jsonl", [edit(2)])  # a new file under the same name meanwhile
    resumed, new = run(db, spool).files
    assert resumed.resumed and resumed.destination == Path("processed/a.jsonl")
    assert json.loads((spool / "processed/a.jsonl").read_text()) == edit(1)
    assert not new.resumed and new.destination.name == f"a.{new.sha256[:8]}.jsonl"
    assert {f.status for f in list_spool_files(db)} == {SpoolFileStatus.PROCESSED}
    assert edit_count(db) == 2


def test_a_failed_move_leaves_the_file_for_the_next_run(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while moving skips the file (logged); the next run finishes it."""

    def fail(src: Path, dest: Path) -> None:
        raise PermissionError("read-only folder")

    drop(spool, "a.jsonl", [edit(1)])
    monkeypatch.setattr(spool_mod, "_move", fail)
    with capture_logs() as logs:
        result = run(db, spool)
    assert result.files == () and result.skipped == ("a.jsonl",)
    assert any(e["event"] == "spool_file_skipped" for e in logs)
    monkeypatch.undo()
    (report,) = run(db, spool).files
    assert report.resumed and edit_count(db) == 1


def test_a_file_changed_while_read_is_left_alone(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content that differs from what was hashed rolls the import back."""
    drop(spool, "a.jsonl", [edit(1)])
    real = spool_mod._probe

    def stale(path: Path, max_file_bytes: int) -> Any:
        probe = real(path, max_file_bytes)
        return spool_mod._Probe("0" * 64, probe.size, probe.problem)

    monkeypatch.setattr(spool_mod, "_probe", stale)
    result = run(db, spool)
    assert result.skipped == ("a.jsonl",) and edit_count(db) == 0 and not list_spool_files(db)
    monkeypatch.undo()
    assert run(db, spool).files[0].accepted == 1


def test_the_write_lock_is_free_between_chunks(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of several chunks commits each in its own transaction: between chunks
    another connection sees the lines so far and writes at once (busy timeout 0.2 s)."""
    drop(spool, "big.jsonl", [edit(i) for i in range(35)])
    seen: list[tuple[int, int]] = []
    with Store.open(db.path) as other:
        other.db.execute("PRAGMA busy_timeout = 200")

        def between(name: str, lines_done: int) -> None:
            committed = edit_count(other)
            EditQueue(other).submit_many([edit(1000 + lines_done)])  # takes the write lock
            seen.append((lines_done, committed))

        monkeypatch.setattr(spool_mod, "_chunk_committed", between)
        (report,) = run(db, spool, chunk_lines=10).files
    assert seen == [(10, 10), (20, 21), (30, 32)]
    assert report.status == "processed" and report.accepted == 35 and edit_count(db) == 38
    assert [r.line for r in report.rejected] == [] and len(report.edit_ids) == 35


def test_a_crash_mid_file_resumes_after_the_last_chunk(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after two chunks committed: the row says importing with 20 lines
    done; the next run imports lines 21-35 only, and the report covers every line."""
    drop(
        spool, "a.jsonl", [edit(i) for i in range(30)] + ["bad", *[edit(i) for i in range(30, 34)]]
    )

    def die(name: str, lines_done: int) -> None:
        if lines_done == 20:
            raise SimulatedCrash

    monkeypatch.setattr(spool_mod, "_chunk_committed", die)
    with pytest.raises(SimulatedCrash):
        run(db, spool, chunk_lines=10)
    (row,) = list_spool_files(db)
    assert row.status is SpoolFileStatus.IMPORTING and row.lines_done == 20
    assert edit_count(db) == 20 and (spool / "incoming" / "a.jsonl").exists()
    monkeypatch.undo()
    (report,) = run(db, spool, chunk_lines=10).files
    assert (report.status, report.lines, report.accepted) == ("processed", 35, 34)
    assert [r.line for r in report.rejected] == [31] and edit_count(db) == 35
    assert report.extra["resumed_after_line"] == 20
    queue = EditQueue(db)
    items = []
    for edit_id in report.edit_ids:
        request = queue.get(edit_id).request
        assert request is not None
        items.append(request.source.to_json_dict()["item_id"])
    assert items == [str(n) for n in [*range(1, 31), *range(32, 36)]]
    assert report_file(spool, "processed/a.jsonl")["edit_ids"] == list(report.edit_ids)
    finished = get_spool_file(db, report.sha256)
    assert finished is not None and finished.status is SpoolFileStatus.PROCESSED


def test_a_long_file_without_a_valid_line_keeps_its_rejected_lines(db: Store, spool: Path) -> None:
    """Over one chunk, the rejected edits of an all-invalid file stay (the record of why)."""
    drop(spool, "bad.jsonl", [f"nope {i}" for i in range(25)])
    (report,) = run(db, spool, chunk_lines=10).files
    assert report.status == "rejected" and report.reason == "no valid edit line"
    assert edit_count(db) == 25 and report.edit_ids == ()
    assert all(r.edit_id is not None for r in report.rejected) and len(report.rejected) == 25
    assert (spool / "rejected" / "bad.jsonl").exists()


def test_a_file_changed_after_some_chunks_keeps_them(
    db: Store, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks committed before the change is seen stay, the last one is rolled back; the
    row is rejected with a reason saying so and the file waits in incoming/."""
    drop(spool, "a.jsonl", [edit(1), edit(2), edit(3)])
    real = spool_mod._probe

    def stale(path: Path, max_file_bytes: int) -> Any:
        probe = real(path, max_file_bytes)
        return spool_mod._Probe("0" * 64, probe.size, probe.problem)

    monkeypatch.setattr(spool_mod, "_probe", stale)
    result = run(db, spool, chunk_lines=1)
    assert result.skipped == ("a.jsonl",) and edit_count(db) == 3
    row = get_spool_file(db, "0" * 64)
    assert row is not None and row.status is SpoolFileStatus.REJECTED
    assert "changed while it was read: lines 1-3 (3 edit lines)" in row.report["reason"]
    monkeypatch.undo()
    (again,) = run(db, spool, chunk_lines=1).files
    assert (again.status, again.accepted, again.duplicates) == ("processed", 0, 3)
    assert edit_count(db) == 3


def test_concurrent_importers_import_each_file_once(db: Store, spool: Path) -> None:
    """Two importers on separate connections: every file and line lands exactly once."""
    for f in range(6):
        drop(spool, f"f{f}.jsonl", [edit(f * 100 + i) for i in range(40)])
    results: list[SpoolImport] = []

    def worker() -> None:
        with Store.open(db.path) as own:
            results.append(run(own, spool))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert edit_count(db) == 240 and len(list_spool_files(db)) == 6
    fresh = [f.name for r in results for f in r.files if not f.resumed]
    assert sorted(fresh) == [f"f{f}.jsonl" for f in range(6)]
    assert sorted(p.name for p in (spool / "processed").glob("*.jsonl")) == sorted(fresh)


@pytest.mark.slow
def test_a_large_file_imports_in_seconds(db: Store, spool: Path) -> None:
    """100,000 lines in one file: streamed and imported in chunks of 1,000 lines."""
    drop(spool, "big.jsonl", [edit(i) for i in range(100_000)])
    t0 = time.perf_counter()
    (report,) = run(db, spool, max_file_bytes=1 << 30).files
    assert report.accepted == 100_000
    assert time.perf_counter() - t0 < 60


def test_utf8_errors_are_found_across_blocks(tmp_path: Path) -> None:
    """The probe reads 1 MiB blocks: a character split between blocks is fine, and a bad
    byte is reported at its offset in the file."""
    path = tmp_path / "x.jsonl"
    good = b"a" * ((1 << 20) - 1) + "é".encode()  # the é straddles the block boundary
    path.write_bytes(good + b"ok\n")
    assert spool_mod._probe(path, 1 << 30).problem is None
    path.write_bytes(good + b"\xff\n")
    assert spool_mod._probe(path, 1 << 30).problem == f"not valid UTF-8 (at byte {len(good)})"
    path.write_bytes(good[:-1])  # ends inside a character
    assert spool_mod._probe(path, 1 << 30).problem == f"not valid UTF-8 (at byte {len(good) - 2})"
