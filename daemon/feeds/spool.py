"""The spool: JSONL files of edit requests dropped in a folder, each imported exactly once.

Layout (created on first use)::

    <spool_dir>/incoming/    writers drop files here
    <spool_dir>/processed/   imported files, each with ``<name>.report.json`` beside it
    <spool_dir>/rejected/    files refused as a whole, with their report

Dropping a file: write it under a temporary name (starting with ``.``, or ending
``.tmp`` / ``.part``) in ``incoming/``, then rename it to its final ``*.jsonl`` name.
Only regular ``*.jsonl`` files not starting with ``.`` are read, in name order,
so a half-written file is never imported. Do not reuse a name while it is still in
``incoming/``.

Each non-blank line is one edit request (see ``docs/contracts.md``, "The edit
request"). A line without a ``source`` gets ``{"kind": "spool", "url": <file name,
percent-encoded>, "item_id": "<line number>"}``; a line that names its own source
keeps it. Every edit is stored
with ``source_kind = "spool"``. An invalid line becomes a ``rejected`` edit with its
reason (lines that are not JSON objects carry the file and line in the reason);
a line whose edit already exists (same client id, or same content as a live edit)
is a duplicate. A file is rejected as a whole when it is larger than
``max_file_bytes`` or not UTF-8 (nothing stored but its row), or has no valid
line: then nothing is stored but its row if the file fits in one chunk; a longer
one keeps the rejected edits of its lines (the record of why, never queued), and
its report names them.

Chunks: the lines are imported ``chunk_lines`` (non-blank) lines at a time, each
chunk in its own short write transaction, so the worker and the API can write
between chunks instead of waiting for the whole file.

Exactly once: the file's ``spool_files`` row (keyed by the sha256 of the content,
read before the import) is inserted first as ``importing``. Each chunk's edits
commit with the chunk's results and the row's progress (its last line), so a
crash loses at most the chunk in flight, and the next run, finding the row,
re-reads the file and resumes after the last committed line: no line is imported
twice. The last chunk's transaction checks the content against the sha256 and
marks the row ``imported`` with the whole report. Then, in another transaction,
the report is written atomically, the file is renamed into ``processed/`` or
``rejected/``, the folders are fsynced and the row is marked done; a crash after
the ``imported`` commit only leaves that move for the next run. Two importers on
one spool take turns: a chunk commits only on top of the progress it started
from, and an importer that finds another ahead of it leaves the file to it.

A file whose content differs at the end from its sha256 (it was rewritten in
place: writers must write, then rename) has its last chunk rolled back and is
left in ``incoming/``, where the next run imports its new content (lines already
stored count as duplicates). If earlier chunks committed, they stay (they are
lines of the file as first read) and its row becomes ``rejected`` with a reason
that says how many lines were imported; otherwise the row is deleted and nothing
of it is kept. A row left ``importing`` whose file is gone from ``incoming/`` or
changed (a crash while it was rewritten or removed) is ended the same way.

The same content dropped again under any name (also while it is being imported)
is moved to ``processed/`` with a ``duplicate`` report naming the earlier import.
A name already taken in the destination gets a short sha suffix (``a.jsonl`` ->
``a.1f2e3d4c.jsonl``); nothing is overwritten.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from daemon.errors import EditValidationError, StoreBusyError
from daemon.files import atomic_write_text, fsync_dir, sha256_file
from store import intake
from store.db import Store
from store.schema import EditStatus, RequestLimits, SourceKind
from store.spool import (
    RejectedLine,
    SpoolFile,
    SpoolFileReport,
    SpoolFileStatus,
    finish_spool_file,
    forget_spool_import,
    get_spool_file,
    list_spool_files,
    record_spool_chunk,
    record_spool_import,
    spool_chunks,
    start_spool_import,
)
from store.validation import parse_edit_json

__all__ = ["RejectedLine", "SpoolFileReport", "SpoolImport", "import_spool"]

log = structlog.get_logger()

INCOMING, PROCESSED, REJECTED = "incoming", "processed", "rejected"
_MAX_REASON_CHARS = 500  # per rejected line in a report; the edit keeps the full reason
CHUNK_LINES = 1000
"""Non-blank lines imported per write transaction: the write lock is free between chunks."""


@dataclass(frozen=True)
class SpoolImport:
    """One pass over ``incoming/``: a report per file handled, and the files left for later."""

    files: tuple[SpoolFileReport, ...]
    skipped: tuple[str, ...] = ()

    @property
    def totals(self) -> dict[str, int]:
        """Counts over the files this pass imported (resumed files count only as files)."""
        new = [f for f in self.files if not f.resumed]
        return {
            "files": len(self.files),
            "processed": sum(f.status == "processed" for f in self.files),
            "rejected_files": sum(f.status == "rejected" for f in self.files),
            "duplicate_files": sum(f.status == "duplicate" for f in self.files),
            "skipped": len(self.skipped),
            "lines": sum(f.lines for f in new),
            "accepted": sum(f.accepted for f in new),
            "rejected": sum(len(f.rejected) for f in new),
            "duplicates": sum(f.duplicates for f in new),
        }

    def edit_ids(self) -> list[str]:
        """Every edit the handled files stand for (resumed files included)."""
        return [edit_id for f in self.files for edit_id in f.edit_ids]


@dataclass(frozen=True)
class _Probe:
    sha256: str
    size: int
    problem: str | None  # why the whole file is rejected before reading its lines


class _ChangedError(Exception):
    """The file changed while it was imported: roll the last chunk back, leave the file
    for the next run."""


class _NoValidLineError(Exception):
    """Every line of a one-chunk file was rejected: roll the rejected edits back."""


def ensure_layout(spool_dir: Path) -> None:
    """Create ``incoming/``, ``processed/`` and ``rejected/``."""
    for name in (INCOMING, PROCESSED, REJECTED):
        (spool_dir / name).mkdir(parents=True, exist_ok=True)


def incoming_files(spool_dir: Path) -> list[Path]:
    """The files to import now: regular ``*.jsonl`` files in ``incoming/``, by name."""
    with os.scandir(spool_dir / INCOMING) as entries:
        found = [
            Path(entry.path)
            for entry in entries
            if entry.name.endswith(".jsonl")
            and not entry.name.startswith(".")
            and entry.is_file(follow_symlinks=False)
        ]
    return sorted(found, key=lambda p: p.name)


def import_spool(
    store: Store,
    spool_dir: Path,
    *,
    limits: RequestLimits,
    max_file_bytes: int,
    run_id: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> SpoolImport:
    """Import every file in ``incoming/`` (see the module doc) and finish interrupted ones."""
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    ensure_layout(spool_dir)
    importer = _Importer(store, spool_dir, limits, max_file_bytes, run_id, chunk_lines)
    reports = importer.finish_orphans()
    skipped: list[str] = []
    for path in incoming_files(spool_dir):
        try:
            report = importer.handle(path)
        except (OSError, StoreBusyError, _ChangedError) as exc:
            skipped.append(path.name)
            log.warning("spool_file_skipped", name=path.name, error=f"{type(exc).__name__}: {exc}")
            continue
        if report is not None:
            reports.append(report)
    result = SpoolImport(tuple(reports), tuple(skipped))
    log.info("spool_imported", spool_dir=str(spool_dir), run_id=run_id, **result.totals)
    return result


@dataclass(frozen=True)
class _Importer:
    store: Store
    spool_dir: Path
    limits: RequestLimits
    max_file_bytes: int
    run_id: int | None
    chunk_lines: int = CHUNK_LINES

    def handle(self, path: Path) -> SpoolFileReport | None:
        """Import, resume, finish or set aside as a duplicate one file of ``incoming/``."""
        probe = _probe(path, self.max_file_bytes)
        row = get_spool_file(self.store, probe.sha256)
        if row is None and probe.problem is not None:
            row, created = self.reject_whole(path, probe)
            if not created:
                return None  # another importer committed it meanwhile and finishes it
            return self.finish(row, path, resumed=False)
        if row is None or (row.status is SpoolFileStatus.IMPORTING and row.name == path.name):
            imported = self.import_lines(path, probe)
            if imported is None:
                return None  # another importer is ahead on it and finishes it
            return self.finish(imported, path, resumed=False)
        if row.status is SpoolFileStatus.IMPORTED and row.name == path.name:
            return self.finish(row, path, resumed=True)  # imported by an interrupted run
        return self.move_duplicate(path, probe, row)

    def reject_whole(self, path: Path, probe: _Probe) -> tuple[SpoolFile, bool]:
        """Record a file refused before reading its lines; ``(row, False)`` if already there."""
        assert probe.problem is not None
        with self.store.write():
            earlier = get_spool_file(self.store, probe.sha256)
            if earlier is not None:
                return earlier, False
            acc = _Lines()
            acc.reject_file(probe.problem, rolled_back=True)
            return self.record(path, probe, acc, resumed_after=0), True

    def import_lines(self, path: Path, probe: _Probe) -> SpoolFile | None:
        """Import the file's lines chunk by chunk, from its first line not yet done; the
        ``imported`` row, or ``None`` when another importer is ahead. Raises
        :class:`_ChangedError` (after recording what stays, see :meth:`give_up`)."""
        store, t0 = self.store, time.perf_counter()
        row, _ = start_spool_import(store, probe.sha256, path.name, run_id=self.run_id)
        if row.status is not SpoolFileStatus.IMPORTING or row.name != path.name:
            return None  # taken meanwhile (under this or another name)
        acc, resumed_after = _Lines.restore(spool_chunks(store, row.sha256)), row.lines_done
        done = resumed_after
        digest = hashlib.sha256()
        url = urllib.parse.quote(path.name, safe="")
        with path.open("rb") as f:
            lines = _lines(f, self.limits.max_request_bytes + 2, digest)
            for _ in itertools.islice(lines, done):
                pass  # committed by an earlier run; read only for the digest
            while True:
                try:
                    with store.write():
                        current = get_spool_file(store, row.sha256)
                        if current is None or current.status is not SpoolFileStatus.IMPORTING:
                            return None
                        if current.lines_done != done:
                            return None
                        chunk = _Lines()
                        last, eof = self.submit_chunk(lines, chunk, path.name, url, done)
                        if eof:
                            if digest.hexdigest() != probe.sha256:
                                raise _ChangedError(f"{path.name} changed while it was read")
                            acc.extend(chunk)
                            if not acc.edit_ids and acc.reason is None:
                                reason = "no valid edit line" if acc.lines else "no edit lines"
                                acc.reject_file(reason, rolled_back=False)
                            imported = self.record(path, probe, acc, resumed_after)
                            break
                        record_spool_chunk(store, row.sha256, done + 1, last, chunk.to_json())
                except _ChangedError:
                    self.give_up(row.sha256, "it changed while it was read")
                    raise
                acc.extend(chunk)
                done = last
                _chunk_committed(path.name, done)
        log.debug("spool_file_committed", name=path.name, seconds=time.perf_counter() - t0)
        return imported

    def submit_chunk(
        self,
        lines: Iterator[tuple[int, bytes, bool]],
        chunk: _Lines,
        name: str,
        url: str,
        done: int,
    ) -> tuple[int, bool]:
        """Submit up to ``chunk_lines`` non-blank lines into ``chunk``; ``(last line read,
        end of file)``. At the end of a file with no valid line whose first chunk this
        is, the chunk's rejected edits are rolled back."""
        last = done
        try:
            with self.store.write():  # a savepoint: undone when the whole file is invalid
                for lineno, line, whole in lines:
                    last = lineno
                    if whole and not line.strip():
                        continue
                    chunk.add(lineno, self.submit_line(line, whole, lineno, name, url))
                    if chunk.lines >= self.chunk_lines:
                        return last, False
                if done == 0 and not chunk.edit_ids:
                    raise _NoValidLineError
        except _NoValidLineError:
            chunk.reject_file("no valid edit line" if chunk.lines else "no edit lines")
        return last, True

    def record(self, path: Path, probe: _Probe, acc: _Lines, resumed_after: int) -> SpoolFile:
        """Mark the file ``imported`` with its report (inside the caller's transaction)."""
        store = self.store
        folder = self.spool_dir / (REJECTED if acc.reason else PROCESSED)
        dest = _free_name(folder, path.name, probe.sha256).relative_to(self.spool_dir)
        extra: dict[str, Any] = {"bytes": probe.size, "run_id": self.run_id}
        extra["imported_at"] = store.now()
        if resumed_after:
            extra["resumed_after_line"] = resumed_after
        report = acc.report(path.name, probe.sha256, dest, extra)
        return record_spool_import(store, report, run_id=self.run_id)

    def give_up(self, sha256: str, why: str) -> SpoolFileReport | None:
        """End an ``importing`` row whose file cannot be finished: deleted when no chunk
        committed, else ``rejected`` with a report of the lines that stay. The file, if
        any, is left where it is."""
        with self.store.write():
            row = get_spool_file(self.store, sha256)
            if row is None or row.status is not SpoolFileStatus.IMPORTING:
                return None
            if forget_spool_import(self.store, sha256):
                return None
            acc = _Lines.restore(spool_chunks(self.store, sha256))
            acc.reason = (
                f"{why}: lines 1-{row.lines_done} ({acc.lines} edit lines) were imported "
                "as first read and stay; the rest was not imported from this content"
            )
            extra = {"run_id": self.run_id, "imported_at": row.imported_at}
            report = acc.report(row.name, sha256, Path(INCOMING) / row.name, extra)
            finish_spool_file(self.store, sha256, "rejected", report=report.to_json_dict())
        log.warning("spool_file_abandoned", **report.short_json())
        return report

    def submit_line(
        self, line: bytes, whole: bool, lineno: int, name: str, url: str
    ) -> intake.EnqueueResult:
        store, limits, kind = self.store, self.limits, SourceKind.SPOOL
        if not whole:
            reason = f"line is too large (over {limits.max_request_bytes} bytes)"
            error = EditValidationError(reason, record=lineno, source=name)
            head = line[:1024].decode("utf-8", "replace")
            return intake.reject(store, head, error, client_id=None, source_kind=kind)
        text = line.decode("utf-8").removeprefix("\ufeff")
        obj = _loads(text)
        if isinstance(obj, dict):
            if obj.get("source") is None:
                obj["source"] = {"kind": kind.value, "url": url, "item_id": str(lineno)}
            return intake.submit(store, obj, limits=limits, source_kind=kind)
        try:  # not a JSON object: reject it with the file and line in the reason
            parse_edit_json(text, limits=limits, record=lineno, source=name)
        except EditValidationError as exc:
            client_id = intake.client_id_of(text)
            return intake.reject(store, text, exc, client_id=client_id, source_kind=kind)
        return intake.submit(store, text, limits=limits, source_kind=kind)

    def finish(self, row: SpoolFile, src: Path | None, *, resumed: bool) -> SpoolFileReport | None:
        """Write the report, move ``src`` (``None``: already gone), mark the row; in one
        transaction, so one importer does it. ``None`` when another finished it first
        (and we did not import it)."""
        with self.store.write():
            current = get_spool_file(self.store, row.sha256)
            if current is None or current.status is not SpoolFileStatus.IMPORTED:
                return None if resumed else SpoolFileReport.from_json_dict((current or row).report)
            report = SpoolFileReport.from_json_dict(current.report, resumed=resumed)
            dest = self.spool_dir / report.destination
            if src is not None and dest.exists():  # the name was taken meanwhile: never overwrite
                dest = _free_name(dest.parent, src.name, row.sha256)
                data = {
                    **report.to_json_dict(),
                    "destination": str(dest.relative_to(self.spool_dir)),
                }
                report = SpoolFileReport.from_json_dict(data, resumed=resumed)
            _place(src, dest, report)
            finish_spool_file(self.store, row.sha256, report.status, report=report.to_json_dict())
        _log_finished(report)
        return report

    def move_duplicate(
        self, path: Path, probe: _Probe, earlier: SpoolFile
    ) -> SpoolFileReport | None:
        """Move content imported before to ``processed/`` with a ``duplicate`` report."""
        with self.store.write():
            if not path.exists():
                return None  # another importer moved it
            dest = _free_name(self.spool_dir / PROCESSED, path.name, probe.sha256)
            fields = ("name", "imported_at", "run_id")
            report = SpoolFileReport(
                name=path.name,
                sha256=probe.sha256,
                status="duplicate",
                destination=dest.relative_to(self.spool_dir),
                duplicate_of={
                    **{k: getattr(earlier, k) for k in fields},
                    "status": earlier.status.value,
                    "destination": earlier.report.get("destination"),
                },
                extra={"bytes": probe.size},
            )
            _place(path, dest, report)
        log.info("spool_file_duplicate", name=path.name, sha256=probe.sha256, earlier=earlier.name)
        return report

    def finish_orphans(self) -> list[SpoolFileReport]:
        """Rows still ``imported`` whose file is no longer in ``incoming/`` (a crash after the
        move, or the file was removed): mark them done, writing a missing report. Rows still
        ``importing`` whose file is gone or changed: give them up (:meth:`give_up`). A row
        whose file is still in ``incoming/`` is left to the pass over ``incoming/``."""
        return [
            *self._orphans(
                SpoolFileStatus.IMPORTED, lambda row: self.finish(row, None, resumed=True)
            ),
            *self._orphans(
                SpoolFileStatus.IMPORTING,
                lambda row: self.give_up(row.sha256, "it left incoming/ or changed mid-import"),
            ),
        ]

    def _orphans(
        self, status: SpoolFileStatus, settle: Callable[[SpoolFile], SpoolFileReport | None]
    ) -> list[SpoolFileReport]:
        """``settle`` each row in ``status`` whose file is not in ``incoming/`` as it was."""
        out: list[SpoolFileReport] = []
        for row in list_spool_files(self.store, status=status, limit=-1):
            path = self.spool_dir / INCOMING / row.name
            try:
                if path.exists() and sha256_file(path) == row.sha256:
                    continue
                report = settle(row)
            except (OSError, StoreBusyError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("spool_file_skipped", name=row.name, error=error)
                continue
            if report is not None:
                out.append(report)
        return out


class _Lines:
    """What the lines of one file became, gathered while they are submitted."""

    def __init__(self) -> None:
        self.lines = self.accepted = self.duplicates = 0
        self.rejected: list[RejectedLine] = []
        self.edit_ids: list[str] = []
        self.reason: str | None = None

    def add(self, lineno: int, result: intake.EnqueueResult) -> None:
        self.lines += 1
        if result.status is EditStatus.REJECTED:
            reason = (result.reason or "rejected")[:_MAX_REASON_CHARS]
            self.rejected.append(RejectedLine(lineno, reason, result.id))
            return
        if result.created:
            self.accepted += 1
        else:
            self.duplicates += 1
        self.edit_ids.append(result.id)

    def reject_file(self, reason: str, *, rolled_back: bool = True) -> None:
        """The whole file is rejected (``rolled_back``: its lines' edits were undone)."""
        self.reason, self.accepted, self.duplicates, self.edit_ids = reason, 0, 0, []
        if rolled_back:
            self.rejected = [r._replace(edit_id=None) for r in self.rejected]

    def extend(self, other: _Lines) -> None:
        """Add the lines of the next chunk (a whole-file reason included)."""
        self.lines += other.lines
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)
        self.edit_ids.extend(other.edit_ids)
        self.reason = self.reason or other.reason

    def to_json(self) -> dict[str, Any]:
        """A committed chunk's results, as :meth:`restore` reads them back."""
        return {
            "lines": self.lines,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "rejected_lines": [line._asdict() for line in self.rejected],
            "edit_ids": self.edit_ids,
        }

    @classmethod
    def restore(cls, chunks: list[dict[str, Any]]) -> _Lines:
        """The results of the chunks committed so far (:meth:`to_json`'s form)."""
        acc = cls()
        for chunk in chunks:
            acc.lines += int(chunk["lines"])
            acc.accepted += int(chunk["accepted"])
            acc.duplicates += int(chunk["duplicates"])
            acc.rejected.extend(RejectedLine(**line) for line in chunk["rejected_lines"])
            acc.edit_ids.extend(chunk["edit_ids"])
        return acc

    def report(self, name: str, sha256: str, dest: Path, extra: dict[str, Any]) -> SpoolFileReport:
        status = "rejected" if self.reason else "processed"
        return SpoolFileReport(
            name,
            sha256,
            status,
            dest,
            self.lines,
            self.accepted,
            tuple(self.rejected),
            self.duplicates,
            tuple(self.edit_ids),
            reason=self.reason,
            extra=extra,
        )


def _place(src: Path | None, dest: Path, report: SpoolFileReport) -> None:
    """Report first, then the rename, then fsync both folders (``src``: ``None`` when the
    file already left incoming/; a missing report is written then)."""
    report_path = dest.with_name(dest.name + ".report.json")
    if src is not None or not report_path.exists():
        text = json.dumps(report.to_json_dict(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(report_path, text)
    if src is not None:
        _move(src, dest)
        fsync_dir(src.parent)
    elif not dest.exists():
        log.warning("spool_file_missing", name=report.name, sha256=report.sha256)
    fsync_dir(dest.parent)


def _chunk_committed(name: str, lines_done: int) -> None:
    """Called after each chunk commits, outside any transaction (tests replace it)."""
    log.debug("spool_chunk_committed", name=name, lines_done=lines_done)


def _move(src: Path, dest: Path) -> None:
    """Rename within the spool folder (atomic; tests replace this to simulate a crash)."""
    src.rename(dest)


def _log_finished(report: SpoolFileReport) -> None:
    event = "spool_file_rejected" if report.status == "rejected" else "spool_file_imported"
    log.info(event, **report.short_json())


def _probe(path: Path, max_file_bytes: int) -> _Probe:
    """sha256, size, and whether the whole file is UTF-8 and small enough: one read."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, problem = 0, None
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_file_bytes:
            problem = f"file is too large ({size} bytes; the limit is {max_file_bytes})"
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if problem is None:
                problem = _utf8_problem(decoder, block, offset)
            offset += len(block)
    if problem is None:
        problem = _utf8_problem(decoder, b"", offset, final=True)
    return _Probe(digest.hexdigest(), offset, problem)


def _utf8_problem(
    decoder: codecs.IncrementalDecoder, block: bytes, offset: int, *, final: bool = False
) -> str | None:
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(block, final=final)
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (at byte {offset - pending + exc.start})"
    return None


def _lines(f: IO[bytes], cap: int, digest: Any) -> Iterator[tuple[int, bytes, bool]]:
    """``(number, line, whole)`` without end-of-line bytes; a line of ``cap`` bytes or more
    comes as its first ``cap`` bytes with ``whole = False``. Every byte read goes into
    ``digest``."""
    lineno = 0
    while line := f.readline(cap):
        digest.update(line)
        lineno += 1
        if len(line) == cap and not line.endswith(b"\n"):
            while rest := f.readline(1 << 16):
                digest.update(rest)
                if rest.endswith(b"\n"):
                    break
            yield lineno, line, False
        else:
            yield lineno, line.rstrip(b"\r\n"), True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate field")
    return out


def _loads(text: str) -> object:
    """The decoded line, or ``None`` when it is not JSON (or repeats a key)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        return None


def _free_name(folder: Path, name: str, sha256: str) -> Path:
    """``folder/name``, or with a short sha (then a counter) before the suffix if taken."""
    candidate = folder / name
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, dot + suffix) if stem else (name, "")
    n = 0
    while candidate.exists():
        tag = sha256[:8] if n == 0 else f"{sha256[:8]}-{n}"
        candidate = folder / f"{stem}.{tag}{suffix}"
        n += 1
    return candidate
