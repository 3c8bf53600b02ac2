"""Spool files and nightly runs: what the nightly job imported, and how each run went.

A spool file is remembered by the sha256 of its content. Its lines are imported
in chunks, each in its own transaction: the row is inserted first as ``importing``
(:func:`start_spool_import`); each chunk's edits commit together with the chunk's
results and the row's progress, ``lines_done`` (:func:`record_spool_chunk`), so
an interrupted import resumes after its last committed chunk and no line is
imported twice. The transaction of the last chunk marks the row ``imported`` with
the whole report (:func:`record_spool_import`); once the file has been moved out
of the incoming folder the row becomes ``processed`` or ``rejected``. The
``report`` is the per-file report written beside the moved file (see
:mod:`daemon.feeds.spool`).

A nightly run is a row of ``nightly_runs``: ``running`` from its start, then
``done`` (with its summary) or ``failed`` (the run itself crashed; the summary
says why). See :mod:`daemon.service.nightly`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from daemon.errors import RecordNotFoundError, StoreError
from store.db import Store
from store.schema import EditStatus, Schedule

_SHA256 = re.compile(r"[0-9a-f]{64}")
_IDS_PER_QUERY = 500  # stays under SQLite's limit on bound parameters
REPORT_VERSION = 1


class SpoolFileStatus(StrEnum):
    """``importing``: some chunks of lines are in the store (``lines_done``), not all;
    ``imported``: every line is, the file is not yet moved out of incoming/."""

    IMPORTING = "importing"
    IMPORTED = "imported"
    PROCESSED = "processed"
    REJECTED = "rejected"


class NightlyRunStatus(StrEnum):
    """``failed`` means the run itself crashed, not that some edits failed."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SpoolFile:
    """One row of ``spool_files``."""

    sha256: str
    name: str
    status: SpoolFileStatus
    lines: int
    accepted: int
    rejected: int
    duplicates: int
    report: dict[str, Any]
    run_id: int | None
    imported_at: float
    finished_at: float | None
    lines_done: int = 0  # the last line of the last chunk committed while ``importing``

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {**self.__dict__, "status": self.status.value}


@dataclass(frozen=True)
class NightlyRun:
    """One row of ``nightly_runs``."""

    id: int
    trigger: str
    status: NightlyRunStatus
    started_at: float
    finished_at: float | None
    summary: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {**self.__dict__, "status": self.status.value}


class RejectedLine(NamedTuple):
    """A line that did not become an edit: its number, why, and the rejected edit's id."""

    line: int
    reason: str
    edit_id: str | None


@dataclass(frozen=True)
class SpoolFileReport:
    """The report on one spool file (:mod:`daemon.feeds.spool`); ``destination`` is relative
    to the spool folder.

    ``edit_ids`` are the edits its accepted and duplicate lines stand for, in line
    order; ``resumed`` marks a file imported by an earlier, interrupted run and only
    moved by this one; ``extra`` holds ``bytes``, ``run_id`` and ``imported_at``.
    """

    name: str
    sha256: str
    status: str  # "processed" | "rejected" | "duplicate"
    destination: Path
    lines: int = 0
    accepted: int = 0
    rejected: tuple[RejectedLine, ...] = ()
    duplicates: int = 0
    edit_ids: tuple[str, ...] = ()
    reason: str | None = None
    duplicate_of: dict[str, Any] | None = None
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """The report as written to ``<destination>.report.json`` and stored in its row."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("resumed", "extra")}
        return {
            "version": REPORT_VERSION,
            **out,
            "destination": self.destination.as_posix(),
            "rejected": len(self.rejected),
            "rejected_lines": [line._asdict() for line in self.rejected],
            "edit_ids": list(self.edit_ids),
            **self.extra,
        }

    def short_json(self) -> dict[str, Any]:
        """The counts without the per-line lists (for run summaries)."""
        out = self.to_json_dict()
        for key in ("version", "rejected_lines", "edit_ids", "duplicate_of"):
            out.pop(key)
        return {**out, "resumed": self.resumed}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], *, resumed: bool = False) -> SpoolFileReport:
        """Rebuild a report from :meth:`to_json_dict`'s form."""
        plain = ("name", "sha256", "status", "lines", "accepted", "duplicates", "reason")
        known = {*plain, "version", "rejected", "rejected_lines", "edit_ids", "destination"}
        return cls(
            **{k: data[k] for k in plain},
            destination=Path(data["destination"]),
            rejected=tuple(RejectedLine(**line) for line in data["rejected_lines"]),
            edit_ids=tuple(data["edit_ids"]),
            duplicate_of=data.get("duplicate_of"),
            resumed=resumed,
            extra={k: v for k, v in data.items() if k not in known and k != "duplicate_of"},
        )


# --- spool files ---------------------------------------------------------------------


def start_spool_import(
    store: Store, sha256: str, name: str, *, run_id: int | None = None
) -> tuple[SpoolFile, bool]:
    """Claim a file before its first chunk: insert its row as ``importing`` with no line
    done; ``(row, True)``. ``(row, False)`` when a row with this content exists."""
    _check_sha256(sha256)
    with store.write() as db:
        earlier = get_spool_file(store, sha256)
        if earlier is not None:
            return earlier, False
        db.execute(
            "INSERT INTO spool_files (sha256, name, status, run_id, imported_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [sha256, name, SpoolFileStatus.IMPORTING.value, run_id, store.now()],
        )
        return _existing_file(store, sha256), True


def record_spool_chunk(
    store: Store, sha256: str, first_line: int, last_line: int, result: dict[str, Any]
) -> SpoolFile:
    """Record lines ``first_line``..``last_line`` of an ``importing`` file as done, with
    their ``result`` (kept until the file is imported, see :func:`spool_chunks`).

    Call it inside the transaction that stored the chunk's edits. Raises
    :class:`StoreError` unless the row is ``importing`` with ``first_line - 1`` lines
    done (another importer got there first); :class:`RecordNotFoundError`.
    """
    if not 1 <= first_line <= last_line:
        raise ValueError(f"a chunk is lines 1 <= first <= last, got {first_line}..{last_line}")
    counts = [int(result.get(k, 0)) for k in ("lines", "accepted", "rejected", "duplicates")]
    with store.write() as db:
        row = _existing_file(store, sha256)
        if row.status is not SpoolFileStatus.IMPORTING or row.lines_done != first_line - 1:
            raise StoreError(
                f"spool file {sha256} is {row.status.value} with {row.lines_done} lines done; "
                f"lines {first_line}..{last_line} do not follow",
                sha256=sha256,
                name=row.name,
            )
        db.execute(
            "INSERT INTO spool_file_chunks (sha256, first_line, last_line, result) "
            "VALUES (?, ?, ?, ?)",
            [sha256, first_line, last_line, _json(result)],
        )
        db.execute(
            "UPDATE spool_files SET lines_done = ?, lines = lines + ?, accepted = accepted + ?, "
            "rejected = rejected + ?, duplicates = duplicates + ? WHERE sha256 = ?",
            [last_line, *counts, sha256],
        )
        return _existing_file(store, sha256)


def spool_chunks(store: Store, sha256: str) -> list[dict[str, Any]]:
    """The results recorded by :func:`record_spool_chunk` for an ``importing`` file, in
    line order (none once the file is imported or finished)."""
    with store.read() as db:
        rows = db.execute(
            "SELECT result FROM spool_file_chunks WHERE sha256 = ? ORDER BY first_line",
            [sha256],
        ).fetchall()
    return [json.loads(row[0]) for row in rows]


def forget_spool_import(store: Store, sha256: str) -> bool:
    """Delete the row of a file still ``importing`` with no line done (nothing of it was
    stored); whether a row went."""
    with store.write() as db:
        cursor = db.execute(
            "DELETE FROM spool_files WHERE sha256 = ? AND status = ? AND lines_done = 0",
            [sha256, SpoolFileStatus.IMPORTING.value],
        )
        return cursor.rowcount > 0


def record_spool_import(
    store: Store, report: SpoolFileReport, *, run_id: int | None = None
) -> SpoolFile:
    """Record a file as ``imported`` with its report; the row's name and counts are the
    report's. An ``importing`` row (:func:`start_spool_import`) is completed and its
    chunk results dropped; without a row, one is inserted.

    Call it inside the transaction that stored the file's (last) edits. Raises
    :class:`StoreError` when a file with this content was imported before.
    """
    sha256 = report.sha256
    _check_sha256(sha256)
    counts = [report.lines, report.accepted, len(report.rejected), report.duplicates]
    if min(counts) < 0:
        raise ValueError(f"counts must be >= 0, got {counts}")
    with store.write() as db:
        earlier = get_spool_file(store, sha256)
        if earlier is not None and earlier.status is SpoolFileStatus.IMPORTING:
            db.execute(
                "UPDATE spool_files SET name = ?, status = ?, lines = ?, accepted = ?, "
                "rejected = ?, duplicates = ?, report = ? WHERE sha256 = ?",
                [
                    report.name,
                    SpoolFileStatus.IMPORTED.value,
                    *counts,
                    _json(report.to_json_dict()),
                    sha256,
                ],
            )
            db.execute("DELETE FROM spool_file_chunks WHERE sha256 = ?", [sha256])
            return _existing_file(store, sha256)
        if earlier is not None:
            raise StoreError(
                f"spool file {sha256} was already imported (as '{earlier.name}')",
                sha256=sha256,
                name=earlier.name,
            )
        db.execute(
            "INSERT INTO spool_files (sha256, name, status, lines, accepted, rejected, "
            "duplicates, report, run_id, imported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                sha256,
                report.name,
                SpoolFileStatus.IMPORTED.value,
                *counts,
                _json(report.to_json_dict()),
                run_id,
                store.now(),
            ],
        )
        return _existing_file(store, sha256)


def finish_spool_file(
    store: Store,
    sha256: str,
    status: SpoolFileStatus | str,
    *,
    report: dict[str, Any] | None = None,
) -> SpoolFile:
    """Mark a file ``processed`` or ``rejected`` once it left incoming/, or an ``importing``
    one given up (``report`` replaces the stored one when given; chunk results are
    dropped). Raises :class:`RecordNotFoundError`."""
    status = SpoolFileStatus(status)
    if status in (SpoolFileStatus.IMPORTING, SpoolFileStatus.IMPORTED):
        raise ValueError("a spool file is finished as 'processed' or 'rejected'")
    with store.write() as db:
        stored = _existing_file(store, sha256).report if report is None else report
        db.execute(
            "UPDATE spool_files SET status = ?, report = ?, finished_at = ? WHERE sha256 = ?",
            [status.value, _json(stored), store.now(), sha256],
        )
        db.execute("DELETE FROM spool_file_chunks WHERE sha256 = ?", [sha256])
        return _existing_file(store, sha256)


def get_spool_file(store: Store, sha256: str) -> SpoolFile | None:
    """The file imported with this content, or ``None``."""
    found = _select_files(store, "sha256 = ?", [sha256], 1)
    return found[0] if found else None


def list_spool_files(
    store: Store, *, status: SpoolFileStatus | str | None = None, limit: int = 100
) -> list[SpoolFile]:
    """Spool files, newest import first, optionally only those with ``status``.

    ``limit = -1`` lists them all.
    """
    if status is None:
        return _select_files(store, "1 = 1", [], limit)
    return _select_files(store, "status = ?", [SpoolFileStatus(status).value], limit)


# --- nightly runs ----------------------------------------------------------------------


def start_nightly_run(store: Store, trigger: str) -> int:
    """Open a ``running`` nightly run; return its id. ``trigger`` says who started it."""
    if not trigger.strip():
        raise ValueError("a nightly run needs a trigger (e.g. 'scheduler', 'cli')")
    with store.write() as db:
        cursor = db.execute(
            "INSERT INTO nightly_runs (trigger, status, started_at) VALUES (?, ?, ?)",
            [trigger, NightlyRunStatus.RUNNING.value, store.now()],
        )
        return int(cursor.lastrowid or 0)


def finish_nightly_run(
    store: Store, run_id: int, status: NightlyRunStatus | str, summary: dict[str, Any]
) -> NightlyRun:
    """Close a run as ``done`` or ``failed`` with its summary.

    Raises :class:`RecordNotFoundError`.
    """
    status = NightlyRunStatus(status)
    if status is NightlyRunStatus.RUNNING:
        raise ValueError("a nightly run is finished as 'done' or 'failed'")
    with store.write() as db:
        get_nightly_run(store, run_id)
        db.execute(
            "UPDATE nightly_runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
            [status.value, store.now(), _json(summary), run_id],
        )
        return get_nightly_run(store, run_id)


def fail_interrupted_runs(store: Store, triggers: Sequence[str], reason: str) -> int:
    """Close runs with one of ``triggers`` still marked ``running`` as ``failed`` (their
    process died mid-run); how many. The summary keeps what was recorded, plus ``error``."""
    marks = ", ".join("?" for _ in triggers)
    with store.write() as db:
        rows = db.execute(
            f"SELECT id, summary FROM nightly_runs WHERE status = ? AND trigger IN ({marks})",
            [NightlyRunStatus.RUNNING.value, *triggers],
        ).fetchall()
        for run_id, summary in rows:
            closed = {**json.loads(summary or "{}"), "error": reason}
            db.execute(
                "UPDATE nightly_runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
                [NightlyRunStatus.FAILED.value, store.now(), _json(closed), run_id],
            )
    return len(rows)


def get_nightly_run(store: Store, run_id: int) -> NightlyRun:
    """The run with ``run_id``; raises :class:`RecordNotFoundError`."""
    found = _select_runs(store, "id = ?", [run_id], 1)
    if not found:
        raise RecordNotFoundError("nightly run", str(run_id))
    return found[0]


def latest_nightly_run(store: Store) -> NightlyRun | None:
    """The newest run (running or finished), if any."""
    found = list_nightly_runs(store, limit=1)
    return found[0] if found else None


def list_nightly_runs(store: Store, limit: int = 20) -> list[NightlyRun]:
    """Nightly runs, newest first."""
    return _select_runs(store, "1 = 1", [], limit)


# --- edits the nightly run waits for ---------------------------------------------------


def queued_edit_ids(store: Store, schedule: Schedule | str) -> list[str]:
    """Ids of the ``queued`` edits held for ``schedule``, in queue order.

    Read it in the write transaction that releases them to get exactly the released ids.
    """
    with store.read() as db:
        rows = db.execute(
            "SELECT id FROM edits WHERE status = 'queued' AND schedule = ? ORDER BY seq",
            [Schedule(schedule).value],
        ).fetchall()
    return [str(row[0]) for row in rows]


def edit_status_counts(store: Store, edit_ids: Iterable[str]) -> dict[str, int]:
    """How many of ``edit_ids`` are in each state (every state present; unknown ids ignored)."""
    counts = {status.value: 0 for status in EditStatus}
    ids = list(dict.fromkeys(edit_ids))
    with store.read() as db:
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" for _ in chunk)
            for status, count in db.execute(
                f"SELECT status, COUNT(*) FROM edits WHERE id IN ({marks}) GROUP BY status", chunk
            ):
                counts[str(status)] += int(count)
    return counts


# --- internals -------------------------------------------------------------------------


def _check_sha256(sha256: str) -> None:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)


def _existing_file(store: Store, sha256: str) -> SpoolFile:
    found = get_spool_file(store, sha256)
    if found is None:
        raise RecordNotFoundError("spool file", sha256)
    return found


def _select_files(store: Store, where: str, params: list[Any], limit: int) -> list[SpoolFile]:
    sql = f"SELECT * FROM spool_files WHERE {where} ORDER BY imported_at DESC, rowid DESC LIMIT ?"
    with store.read() as db:
        rows = list(db.query(sql, [*params, limit]))
    return [
        SpoolFile(
            sha256=row["sha256"],
            name=row["name"],
            status=SpoolFileStatus(row["status"]),
            lines=int(row["lines"]),
            accepted=int(row["accepted"]),
            rejected=int(row["rejected"]),
            duplicates=int(row["duplicates"]),
            report=json.loads(row["report"]),
            run_id=None if row["run_id"] is None else int(row["run_id"]),
            imported_at=float(row["imported_at"]),
            finished_at=None if row["finished_at"] is None else float(row["finished_at"]),
            lines_done=int(row["lines_done"]),
        )
        for row in rows
    ]


def _select_runs(store: Store, where: str, params: list[Any], limit: int) -> list[NightlyRun]:
    sql = f"SELECT * FROM nightly_runs WHERE {where} ORDER BY id DESC LIMIT ?"
    with store.read() as db:
        rows = list(db.query(sql, [*params, limit]))
    return [
        NightlyRun(
            id=int(row["id"]),
            trigger=row["trigger"],
            status=NightlyRunStatus(row["status"]),
            started_at=float(row["started_at"]),
            finished_at=None if row["finished_at"] is None else float(row["finished_at"]),
            summary=json.loads(row["summary"]),
        )
        for row in rows
    ]
