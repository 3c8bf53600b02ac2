"""Every exception editd raises on purpose, in one place.

Each class carries the context a person needs to act on it (a file, a key, a
field, an edit id) and renders as one line. Wrap lower-level failures with
``raise SomethingError(...) from exc`` so the cause stays in the traceback.

``Shutdown`` derives from ``BaseException`` so that ``except Exception``
blocks in workers and jobs cannot swallow a request to stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EditdError(Exception):
    """Base class for all of editd's own errors."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for API responses and log events."""
        out: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        out.update({k: _jsonable(v) for k, v in self.context.items()})
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# --- configuration -------------------------------------------------------------------


class ConfigError(EditdError):
    """A configuration file is missing, unreadable, malformed or holds a bad value."""

    def __init__(self, message: str, *, path: Path | str | None = None, key: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if key is not None:
            where.append(f"key '{key}'")
        full = f"{': '.join(where)}: {message}" if where else message
        super().__init__(full, path=path, key=key)
        self.path = path
        self.key = key


# --- edit requests -------------------------------------------------------------------


class EditValidationError(EditdError):
    """An edit request failed validation; ``field`` names the offending field."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        record: int | None = None,
        source: str | None = None,
    ):
        parts = []
        if source is not None:
            parts.append(source)
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field '{field}'")
        full = f"{', '.join(parts)}: {message}" if parts else message
        super().__init__(full, field=field, record=record, source=source)
        self.reason = message
        self.field = field
        self.record = record
        self.source = source


class SupersedeNotAllowedError(EditValidationError):
    """A source named in ``supersedes`` (or retracts) an edit that it did not make."""

    def __init__(self, target: str, source: str, owner: str | None):
        made = "is unknown" if owner is None else f"was made by {owner}"
        super().__init__(
            f"edit '{target}' {made}; {source} may supersede or retract only edits it made",
            field="supersedes",
        )
        self.context.update(target=target, source=source, owner=owner)
        self.target = target


# --- store ---------------------------------------------------------------------------


class StoreError(EditdError):
    """The SQLite store could not be opened, migrated or written."""


class StoreUnavailableError(StoreError):
    """The store file is missing, unreadable, or not a SQLite database."""


class StoreIntegrityError(StoreUnavailableError):
    """``PRAGMA quick_check`` found the store's file damaged; ``verdict`` says where."""

    def __init__(self, path: Path | str, verdict: str):
        super().__init__(
            f"store {path}: integrity check failed ({verdict}); restore the file from a "
            "backup or repair it with the sqlite3 shell's .recover",
            path=path,
            verdict=verdict,
        )
        self.verdict = verdict


class MigrationError(StoreError):
    """A schema migration failed or the database is newer than this code."""


class StoreBusyError(StoreError):
    """The store's write lock was not acquired within the busy timeout."""


class EditNotFoundError(StoreError):
    """No edit with the given id exists."""

    def __init__(self, edit_id: str):
        super().__init__(f"no edit with id '{edit_id}'", edit_id=edit_id)
        self.edit_id = edit_id


class RecordNotFoundError(StoreError):
    """No batch, checkpoint, feed (or other stored record) with the given key exists."""

    def __init__(self, kind: str, key: str):
        super().__init__(f"no {kind} with id '{key}'", kind=kind, key=key)
        self.kind = kind
        self.key = key


class IdempotencyConflictError(StoreError):
    """A client id was reused for a request with different content."""

    def __init__(self, edit_id: str):
        super().__init__(
            f"id '{edit_id}' was already used for a different request", edit_id=edit_id
        )
        self.edit_id = edit_id


class InvalidTransitionError(StoreError):
    """An edit cannot move from its current state to the requested one."""

    def __init__(self, edit_id: str, current: str, wanted: str):
        super().__init__(
            f"edit '{edit_id}' cannot go from '{current}' to '{wanted}'",
            edit_id=edit_id,
            current=current,
            wanted=wanted,
        )


class LeaseLostError(StoreError):
    """A worker tried to ack or fail an edit whose lease it no longer holds."""

    def __init__(self, edit_id: str, worker: str):
        super().__init__(
            f"worker '{worker}' no longer holds the lease on edit '{edit_id}'",
            edit_id=edit_id,
            worker=worker,
        )


class StoreInUseError(StoreError):
    """Another editd process holds the store's lock (a second ``editd serve``, or a
    CLI fallback that writes the store while no daemon answers)."""

    def __init__(self, store: Path, lock: Path, pid: int | None, role: str | None):
        holder = "another editd process"
        if pid is not None:
            holder += f" (pid {pid}" + (f", {role}" if role else "") + ")"
        super().__init__(
            f"the store {store} is in use by {holder}; its lock is {lock}",
            store=store,
            lock=lock,
            pid=pid,
            role=role,
        )
        self.store = store
        self.pid = pid
        self.role = role


# --- files ---------------------------------------------------------------------------


class UnsafePathError(EditdError):
    """A file editd writes for itself is a symbolic link (it never writes through one)."""

    def __init__(self, path: Path):
        super().__init__(
            f"{path} is a symbolic link: editd does not write its files through links "
            "(remove it and try again)",
            path=path,
        )
        self.path = path


# --- model ---------------------------------------------------------------------------


class ModelLoadError(EditdError):
    """A model or tokenizer could not be loaded from the configured name or folder."""


class ModelImportError(ModelLoadError):
    """A model file (GGUF) could not be imported into a Hugging Face folder."""


class UnsupportedArchitectureError(EditdError):
    """The model's architecture is not in the architecture table."""


class ChatTemplateError(EditdError):
    """Messages cannot be rendered as a prompt: the model has no chat template (and
    ``[api] chat_template`` names none), or the template refuses the conversation."""


class SubjectNotFoundError(EditValidationError):
    """The subject does not occur in the prompt (or maps to no token)."""


# --- fact world ----------------------------------------------------------------------


class WorldError(EditdError):
    """Base class for errors of the synthetic fact world."""


class WorldBuildError(WorldError):
    """A fact-world build could not start or finish (e.g. the output folder exists)."""

    def __init__(self, message: str, *, path: Path | str | None = None):
        full = f"{path}: {message}" if path is not None else message
        super().__init__(full, path=path)
        self.path = path


class WorldNotReadyError(WorldError):
    """A fact-world model was built but does not know its facts well enough to be used."""

    def __init__(self, path: Path | str, accuracy: float, required: float):
        super().__init__(
            f"{path}: world model is not ready: training-template accuracy "
            f"{accuracy:.3f} is below the required {required:.3f}",
            path=path,
            accuracy=accuracy,
            required=required,
        )
        self.path = path
        self.accuracy = accuracy
        self.required = required


class WorldFormatError(WorldError):
    """A fact-world folder or ``world.json`` is missing, malformed or of another version."""


# --- editors and evaluation ----------------------------------------------------------


class EditorStateError(EditdError):
    """An editor state (checkpoint) has an unknown version or does not fit the model."""


class EditConflictError(EditdError):
    """Edits in one batch conflict (same subject and relation, different targets)."""


class SolveError(EditdError):
    """A closed-form update could not be computed (NaN/inf, or no positive-definite system)."""


class CovarianceStatsError(EditdError):
    """Covariance statistics could not be computed, or a stored artefact is corrupt or stale."""


class BlockCapacityError(EditdError):
    """MELO's block table is full: free blocks (retract) or raise the capacity."""


class NeuronIndexError(EditdError):
    """MELO's neuron-key index is inconsistent, or its file cannot be read or written."""


class EvalDataError(EditdError):
    """An evaluation or benchmark data file cannot be read or has the wrong schema."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        record: int | None = None,
        field: str | None = None,
    ):
        parts = [
            p
            for p in (
                path,
                None if record is None else f"record {record}",
                None if field is None else f"field '{field}'",
            )
            if p
        ]
        super().__init__(
            f"{', '.join(parts)}: {message}" if parts else message,
            path=path,
            record=record,
            field=field,
        )


# --- CLI -----------------------------------------------------------------------------


class NotBuiltYetError(EditdError):
    """A CLI verb or feature that is part of the design but not built yet."""


# --- control flow --------------------------------------------------------------------


class Shutdown(BaseException):
    """Raised to unwind a worker or job when the process is asked to stop."""


class LocateError(EditdError):
    """The locate step cannot run: too few usable fact pairs, no fact source, or a bad result."""


class CheckpointError(EditdError):
    """A checkpoint could not be written, or one on disk is missing, partial or corrupt."""

    def __init__(
        self,
        message: str,
        *,
        checkpoint_id: str | None = None,
        path: Path | str | None = None,
    ):
        full = f"checkpoint {checkpoint_id}: {message}" if checkpoint_id else message
        super().__init__(full, checkpoint_id=checkpoint_id, path=path)
        self.reason = message
        self.checkpoint_id = checkpoint_id
        self.path = path


class DaemonNotReadyError(EditdError):
    """The daemon is still starting (or stopping): the model or the store is not there."""


class DriftDisabledError(EditdError):
    """A drift check was asked for but drift validation is off in the config."""


class FeedFetchError(EditdError):
    """A feed could not be fetched; ``transient`` says whether a later poll may succeed."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status_code: int | None = None,
        attempts: int | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(
            f"{url}: {message}",
            url=url,
            status_code=status_code,
            attempts=attempts,
            transient=transient,
        )
        self.reason = message
        self.url = url
        self.status_code = status_code
        self.attempts = attempts
        self.transient = transient


class FeedParseError(EditdError):
    """The whole document is unusable as a feed (not JSON Feed, Atom or RSS, or broken)."""

    def __init__(self, message: str, *, format: str | None = None) -> None:
        super().__init__(message, format=format)
        self.format = format
