"""Checkpoints on disk: atomic, verified snapshots of the editors' state.

The registry rows live in :mod:`store.checkpoints`; this module owns the folders under the
checkpoint directory: ``ck-<utc stamp>-<hex>/`` (ids sort by time) holding ``manifest.json``
(:class:`CheckpointManifest`) and one sub-folder per editor with what its
``save`` wrote; ``.tmp-*`` entries (being written or deleted, or a crash's leftovers);
``.lock``.

:meth:`CheckpointManager.create` commits in four steps: (1) each editor saves into
``.tmp-<id>/<name>/`` and every file is hashed and fsynced; (2) ``manifest.json`` is written
and fsynced, then every folder; (3) ``.tmp-<id>`` is renamed to ``<id>`` (atomic) and the
directory fsynced; (4) the registry row is inserted with the manifest's sha256: **the commit
point**. A crash before (4) leaves a temp folder or an *orphan* ``<id>`` folder without a
row; :meth:`CheckpointManager.recover` (at start-up) deletes both. Orphans are removed, not
adopted: the registry is the only commit point, and a checkpoint is a cache of "base model +
applied edits" that the edit log can rebuild.

Retention (after each create, and in ``recover``): the newest ``keep`` good checkpoints
stay; older good ones are marked ``bad`` with a note starting ``pruned:`` and their folders
deleted, so ``latest_good`` and ``list_checkpoints(status="good")`` never offer a deleted
one. Folders of every bad checkpoint (pruned, corrupt, or marked bad by the drift job) are
deleted too; rows stay as history. Folders are deleted by renaming them to ``.tmp-del-*``
first, so a crash mid-delete leaves only temp.

Writers take an exclusive ``flock`` on ``.lock`` (released by the kernel if the process
dies), so processes and threads take turns. Two stores must not share one directory: each
would take the other's checkpoints for orphans.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import structlog
import torch

from daemon.editors.base import Editor
from daemon.errors import CheckpointError, RecordNotFoundError
from daemon.files import fsync_dir, open_private, sha256_file
from store import checkpoints as registry
from store.checkpoints import CheckpointRecord, CheckpointStatus
from store.db import Store

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
PRUNED_NOTE = "pruned"

_ALL = 1_000_000  # a list_checkpoints limit meaning "every row"

log = structlog.get_logger()


# --- manifest.json: what a checkpoint holds, and the checks a manifest must pass -----------
# Written by CheckpointManager beside the editors' folders and hashed into the registry
# row; read back on verify and restore. Every field is validated on construction, with
# errors that name the field.

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

ID = re.compile(r"ck-\d{8}T\d{12}Z-[0-9a-f]{8}")
"""Checkpoint ids: ``ck-<utc %Y%m%dT%H%M%S%f>Z-<8 hex>``, sortable by time."""
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""Editor names: safe folder names."""
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CheckpointManifest:
    """``manifest.json``: what a checkpoint holds, validated on construction.

    ``edit_ids`` maps each editor name to its applied edit ids (in applied order);
    ``files`` maps each file's path (relative, ``/``-separated, below an editor's folder)
    to its sha256 hex digest; ``extra`` is free-form JSON (``reason``, model fingerprint).
    """

    checkpoint_id: str
    created_at: float
    watermark: int
    edit_ids: dict[str, list[str]]
    files: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        validate_manifest(self)

    @property
    def edit_count(self) -> int:
        """The number of distinct edit ids over all editors."""
        return len({i for ids in self.edit_ids.values() for i in ids})

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, ASCII, trailing newline)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointManifest:
        """Parse and validate; raise :class:`CheckpointError` naming what is wrong."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{MANIFEST} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{MANIFEST} must hold a JSON object, not {_kind(data)}")
        version = data.get("format_version")
        _check(version == FORMAT_VERSION, "format_version", f"{version!r} is not supported")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"extra"})
        unknown = sorted(set(data) - names)
        _check(not missing and not unknown, "*", f"missing {missing}, unknown {unknown}")
        return cls(**data)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise CheckpointError(f"{MANIFEST} field '{name}': {message}")


def validate_manifest(m: CheckpointManifest) -> None:
    """Field-named checks of every field; raises :class:`CheckpointError`."""
    version = m.format_version
    message = f"{version!r} is not supported (this code reads {FORMAT_VERSION})"
    _check(is_int(version) and version == FORMAT_VERSION, "format_version", message)
    ok = isinstance(m.checkpoint_id, str) and ID.fullmatch(m.checkpoint_id) is not None
    _check(ok, "checkpoint_id", f"must be ck-<utc stamp>-<hex>, got {m.checkpoint_id!r}")
    ok = isinstance(m.created_at, int | float) and not isinstance(m.created_at, bool)
    _check(ok and math.isfinite(m.created_at), "created_at", f"bad time {m.created_at!r}")
    _check(is_int(m.watermark) and m.watermark >= 0, "watermark", f"bad id {m.watermark!r}")
    ok = isinstance(m.edit_ids, dict) and bool(m.edit_ids)
    _check(ok, "edit_ids", f"must be a non-empty object, not {_kind(m.edit_ids)}")
    for name, ids in m.edit_ids.items():
        ok = isinstance(name, str) and NAME.fullmatch(name) is not None
        _check(ok, "edit_ids", f"has an unsafe editor name {name!r}")
        ok = isinstance(ids, list) and all(isinstance(i, str) and i for i in ids)
        _check(ok, "edit_ids", f"['{name}'] must be a list of non-empty strings")
    _check(isinstance(m.files, dict), "files", f"must be an object, not {_kind(m.files)}")
    for rel, digest in m.files.items():
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        ok = len(parts) >= 2 and rel == "/".join(parts) and parts[0] in m.edit_ids
        _check(ok and ".." not in parts, "files", f"{rel!r} is outside the editors' folders")
        ok = isinstance(digest, str) and SHA256.fullmatch(digest) is not None
        _check(ok, "files", f"['{rel}'] must be 64 lowercase hex digits, got {digest!r}")
    _check(isinstance(m.extra, dict), "extra", f"must be an object, not {_kind(m.extra)}")


@runtime_checkable
class Persistable(Protocol):
    """What a checkpoint needs from an editor (MeloEditor and HookEditor fit)."""

    def save(self, directory: Path) -> None:
        """Write the full state as files into ``directory`` (which exists and is empty)."""

    def load(self, directory: Path) -> None:
        """Replace the state with what ``save`` wrote into ``directory``."""

    def applied_ids(self) -> list[str]:
        """The ids of the edits the state holds, in applied order."""


class StateDictFiles:
    """An editor that gives only ``state_dict`` / ``load_state_dict`` (the :class:`Editor`
    protocol), checkpointed as one ``state.pt`` file: ``torch.save`` on save, and
    ``torch.load(weights_only=True)`` on load, so a file cannot run code."""

    FILE = "state.pt"

    def __init__(self, editor: Editor) -> None:
        self.editor = editor

    def save(self, directory: Path) -> None:
        torch.save(self.editor.state_dict(), directory / self.FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / self.FILE, map_location="cpu", weights_only=True)
        self.editor.load_state_dict(state)

    def applied_ids(self) -> list[str]:
        return self.editor.applied_ids()


def persistable(editor: Editor) -> Persistable:
    """``editor`` itself when it saves to files, else its state dict in one file."""
    return editor if isinstance(editor, Persistable) else StateDictFiles(editor)


@dataclass(frozen=True)
class CheckpointInfo:
    """A registry row plus whether its folder is still on disk."""

    record: CheckpointRecord
    exists: bool

    @property
    def restorable(self) -> bool:
        """Good and present (not yet verified: :meth:`CheckpointManager.verify` does that)."""
        return self.exists and self.record.status is CheckpointStatus.GOOD


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`CheckpointManager.recover` removed (folder names) and pruned (ids)."""

    temp_removed: tuple[str, ...]
    orphans_removed: tuple[str, ...]
    pruned: tuple[str, ...]


class CheckpointManager:
    """Writes, verifies, restores and prunes the checkpoints under ``directory``."""

    def __init__(self, directory: Path, store: Store, keep: int) -> None:
        if not is_int(keep) or keep < 1:
            raise CheckpointError(f"keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.store = store
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def create(
        self,
        editors: Mapping[str, Persistable],
        *,
        watermark: int,
        reason: str,
        extra: Mapping[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Snapshot ``editors`` (name -> editor) atomically, register it, then prune.

        ``watermark`` is the id of the last store event the state includes. The caller
        keeps edits from being applied meanwhile (an editor whose ``applied_ids`` change
        during its ``save`` fails the checkpoint). On failure nothing is left behind.
        """
        bad_names = [name for name in editors if not NAME.fullmatch(name)]
        if not editors or bad_names:
            raise CheckpointError(f"need one or more editors with safe names, got {bad_names}")
        if not is_int(watermark) or watermark < 0:
            raise CheckpointError(f"watermark must be an integer >= 0, got {watermark!r}")
        details = {**(extra or {}), "reason": reason}
        try:
            json.dumps(details, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"extra must be plain JSON: {exc}") from exc
        t0 = time.perf_counter()
        with self._locked():
            manifest, digest, size = self._write(self._new_id(), editors, watermark, details)
            record = self._register(manifest, digest, reason)
            try:  # the checkpoint is committed: a failed prune only warns
                pruned = self._prune()
            except Exception as exc:
                log.warning("checkpoint_prune_failed", error=str(exc))
                pruned = []
        event = {"checkpoint_id": record.id, "edit_count": record.edit_count, "bytes": size}
        event |= {"watermark": watermark, "reason": reason, "pruned": pruned}
        log.info("checkpoint_created", **event, seconds=round(time.perf_counter() - t0, 3))
        return record

    def _new_id(self) -> str:
        stamp = datetime.fromtimestamp(self.store.now(), tz=UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return f"ck-{stamp}-{uuid.uuid4().hex[:8]}"

    def _write(
        self,
        checkpoint_id: str,
        editors: Mapping[str, Persistable],
        watermark: int,
        extra: dict[str, Any],
    ) -> tuple[CheckpointManifest, str, int]:
        """Steps 1-3 of the commit: the complete folder ``<id>``, or nothing."""
        tmp = self.directory / f"{TMP_PREFIX}{checkpoint_id}"
        tmp.mkdir()
        try:
            edit_ids = {name: _save_editor(name, editors[name], tmp) for name in sorted(editors)}
            files, dirs, odd = _entries(tmp)
            if odd:
                raise CheckpointError(f"editors wrote entries that are not plain files: {odd}")
            hashes = {_relative(p, tmp): sha256_file(p, fsync=True) for p in files}
            now = self.store.now()
            manifest = CheckpointManifest(checkpoint_id, now, watermark, edit_ids, hashes, extra)
            raw = manifest.to_json().encode("ascii")
            with (tmp / MANIFEST).open("xb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            for folder in reversed(dirs):  # children before their parents
                fsync_dir(folder)
            size = sum(p.stat().st_size for p in files) + len(raw)
            tmp.rename(self.directory / checkpoint_id)
            fsync_dir(self.directory)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # no row yet: neither folder is a checkpoint
            shutil.rmtree(self.directory / checkpoint_id, ignore_errors=True)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                message = f"could not be written: {exc}"
                raise CheckpointError(message, checkpoint_id=checkpoint_id, path=tmp) from exc
            raise
        return manifest, hashlib.sha256(raw).hexdigest(), size

    def _register(self, manifest: CheckpointManifest, digest: str, reason: str) -> CheckpointRecord:
        """Step 4, the commit point; on failure the folder goes (unless the row exists)."""
        final = self.directory / manifest.checkpoint_id
        try:
            return registry.record_checkpoint(
                self.store,
                path=final,
                watermark=manifest.watermark,
                edit_count=manifest.edit_count,
                manifest_sha256=digest,
                note=reason or None,
                checkpoint_id=manifest.checkpoint_id,
            )
        except BaseException:
            if not self._has_row(manifest.checkpoint_id):
                self._delete_dir(final)
            raise

    def verify(self, record: CheckpointRecord) -> CheckpointManifest:
        """The checkpoint's manifest, after checking every byte against the registry.

        Raises :class:`CheckpointError` when the folder or ``manifest.json`` is missing,
        the manifest's sha256 differs from the registry's, the manifest is invalid or
        names another checkpoint, or a listed file is missing, altered or unlisted.
        """
        folder = Path(record.path)
        where: dict[str, Any] = {"checkpoint_id": record.id, "path": folder}
        if not folder.is_dir():
            raise CheckpointError("its folder is missing", **where)
        try:
            raw = (folder / MANIFEST).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read {MANIFEST}: {exc.strerror}", **where) from exc
        digest = hashlib.sha256(raw).hexdigest()
        if digest != record.manifest_sha256:
            raise CheckpointError(
                f"{MANIFEST} has sha256 {digest[:16]}…, the registry recorded "
                f"{record.manifest_sha256[:16]}… (truncated or modified)",
                **where,
            )
        try:
            manifest = CheckpointManifest.from_json(raw)
        except CheckpointError as exc:
            raise CheckpointError(exc.reason, **where) from exc
        if (manifest.checkpoint_id, manifest.watermark) != (record.id, record.watermark):
            raise CheckpointError(f"{MANIFEST} describes another checkpoint", **where)
        problems = _file_problems(folder, manifest)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError("; ".join(problems[:5]) + more, **where)
        return manifest

    def latest_valid(self) -> tuple[CheckpointRecord, CheckpointManifest] | None:
        """The newest good checkpoint that verifies; failing ones are marked bad on the way."""
        with self._locked():
            for record in self._good():
                try:
                    return record, self.verify(record)
                except CheckpointError as exc:
                    note = f"failed verification: {exc.reason}"
                    registry.mark_bad(self.store, record.id, note=note)
                    where = {"checkpoint_id": record.id, "path": record.path}
                    log.warning("checkpoint_verification_failed", **where, reason=exc.reason)
        return None

    def restore(
        self, record: CheckpointRecord, editors: Mapping[str, Persistable]
    ) -> CheckpointManifest:
        """Verify ``record``, then ``load`` each editor from its folder.

        The editors given must be exactly those in the manifest, and the checkpoint must
        still be good; otherwise :class:`CheckpointError` is raised before any load. If
        an editor's ``load`` fails, the editors before it (in name order) already hold
        the checkpoint's state: the error names them.
        """
        t0 = time.perf_counter()
        with self._locked():
            current = registry.get_checkpoint(self.store, record.id)
            where: dict[str, Any] = {"checkpoint_id": record.id, "path": current.path}
            if current.status is not CheckpointStatus.GOOD:
                raise CheckpointError(f"is marked bad ({current.note}); not restored", **where)
            manifest = self.verify(current)
            wanted, given = set(manifest.edit_ids), set(editors)
            if wanted != given:
                raise CheckpointError(
                    f"holds editors {sorted(wanted)} but {sorted(given)} were given "
                    f"(missing {sorted(wanted - given)}, unexpected {sorted(given - wanted)})",
                    **where,
                )
            loaded: builtins.list[str] = []
            for name in sorted(wanted):
                _load_editor(name, editors[name], Path(current.path) / name, manifest, loaded)
                loaded.append(name)
        event = {"checkpoint_id": record.id, "watermark": manifest.watermark, "editors": loaded}
        log.info("checkpoint_restored", **event, seconds=round(time.perf_counter() - t0, 3))
        return manifest

    def recover(self) -> RecoveryReport:
        """Start-up: remove temp folders and orphans (folders without a row), then prune."""
        with self._locked():
            temp, orphans = self._cleanup_temp(), self._remove_orphans()
            report = RecoveryReport(tuple(temp), tuple(orphans), tuple(self._prune()))
        log.info("checkpoints_recovered", directory=str(self.directory), **asdict(report))
        return report

    def cleanup_temp(self) -> builtins.list[str]:
        """Remove leftover ``.tmp-*`` entries (a crashed create or delete); their names."""
        with self._locked():
            return self._cleanup_temp()

    def _cleanup_temp(self) -> builtins.list[str]:
        removed = [e for e in sorted(self.directory.iterdir()) if e.name.startswith(TMP_PREFIX)]
        for entry in removed:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            log.warning("checkpoint_temp_removed", path=str(entry))
        return [entry.name for entry in removed]

    def _remove_orphans(self) -> builtins.list[str]:
        orphans = [e for e in self._checkpoint_dirs() if not self._has_row(e.name)]
        for entry in orphans:
            self._delete_dir(entry)
            why = "folder without a registry row (a crash before it was recorded)"
            log.warning("checkpoint_orphan_removed", checkpoint_id=entry.name, reason=why)
        return [entry.name for entry in orphans]

    def _prune(self) -> builtins.list[str]:
        good = self._good()
        note = f"{PRUNED_NOTE}: older than the newest {self.keep} good checkpoints; folder deleted"
        for record in good[self.keep :]:  # rows first: a crash then leaves a bad row's folder
            registry.mark_bad(self.store, record.id, note=note)
            log.info("checkpoint_pruned", checkpoint_id=record.id, keep=self.keep)
        kept = {record.id for record in good[: self.keep]}
        for entry in self._checkpoint_dirs():
            if entry.name not in kept and self._has_row(entry.name):
                self._delete_dir(entry)  # a bad checkpoint's folder (its row stays)
        return [record.id for record in good[self.keep :]]

    def _good(self) -> builtins.list[CheckpointRecord]:
        return registry.list_checkpoints(self.store, status=CheckpointStatus.GOOD, limit=_ALL)

    def _checkpoint_dirs(self) -> builtins.list[Path]:
        entries = sorted(self.directory.iterdir())
        return [e for e in entries if ID.fullmatch(e.name) and e.is_dir() and not e.is_symlink()]

    def _has_row(self, checkpoint_id: str) -> bool:
        try:
            registry.get_checkpoint(self.store, checkpoint_id)
        except RecordNotFoundError:
            return False
        return True

    def _delete_dir(self, folder: Path) -> None:
        doomed = self.directory / f"{TMP_PREFIX}del-{folder.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            folder.rename(doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.directory)
        shutil.rmtree(doomed, ignore_errors=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive flock on ``.lock``; not re-entrant: public methods never nest."""
        fd = open_private(self.directory / LOCK_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def list(self, *, limit: int = 100) -> builtins.list[CheckpointInfo]:
        """Registry rows, newest first, each with whether its folder exists."""
        rows = registry.list_checkpoints(self.store, limit=limit)
        return [CheckpointInfo(record=r, exists=Path(r.path).is_dir()) for r in rows]


def _save_editor(name: str, editor: Persistable, tmp: Path) -> builtins.list[str]:
    """Save one editor into ``tmp/name``; its applied ids, which must not change meanwhile."""
    folder = tmp / name
    folder.mkdir()
    before = list(editor.applied_ids())
    try:
        editor.save(folder)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"editor '{name}' failed to save: {exc}") from exc
    after = list(editor.applied_ids())
    if after != before:
        raise CheckpointError(f"editor '{name}' changed its applied edits while being saved")
    return after


def _load_editor(
    name: str, editor: Persistable, folder: Path, manifest: CheckpointManifest, done: list[str]
) -> None:
    where: dict[str, Any] = {"checkpoint_id": manifest.checkpoint_id, "path": folder}
    try:
        editor.load(folder)
    except Exception as exc:
        message = f"editor '{name}' failed to load (already restored: {done}): {exc}"
        raise CheckpointError(message, **where) from exc
    if list(editor.applied_ids()) != manifest.edit_ids[name]:
        message = f"editor '{name}' holds other edits than the manifest lists after loading"
        raise CheckpointError(f"{message} (already restored: {done})", **where)


def _file_problems(folder: Path, manifest: CheckpointManifest) -> list[str]:
    problems = []
    for rel, expected in sorted(manifest.files.items()):
        path = folder / rel
        if not path.is_file() or path.is_symlink():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel} does not match its sha256 (corrupt)")
    problems += [f"{n}/ is missing" for n in manifest.edit_ids if not (folder / n).is_dir()]
    files, _, odd = _entries(folder)
    listed = {*manifest.files, MANIFEST}
    unlisted = [rel for rel in (_relative(p, folder) for p in files) if rel not in listed]
    problems += [f"{rel} is not listed in the manifest" for rel in unlisted]
    return problems + [f"{rel} is not a plain file" for rel in odd]


def _entries(root: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Plain files, folders (``root`` first, parents before children) and other entries."""
    files: list[Path] = []
    dirs: list[Path] = [root]
    odd: list[str] = []
    for top, dirnames, filenames in os.walk(root):
        for path in [Path(top) / name for name in sorted(dirnames) + sorted(filenames)]:
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                odd.append(_relative(path, root))
            else:
                (dirs if path.is_dir() else files).append(path)
    return files, dirs, odd


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
