"""``manifest.json``: what a checkpoint holds, and the checks a manifest must pass.

Written by :class:`daemon.service.checkpoints.CheckpointManager` beside the editors' folders
and hashed into the registry row; read back on verify and restore. Every field is
validated on construction, with errors that name the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

from daemon.errors import CheckpointError

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
