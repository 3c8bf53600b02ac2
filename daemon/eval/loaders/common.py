"""Shared plumbing of the benchmark loaders: reading files, typed field access, validation.

Numbering and errors: record ``N`` is the ``N``-th element (1-based) of the file's record
array (for KnowEdit's trivia files, of its edit list). A problem with the whole file (not
UTF-8, not JSON, wrong top level, first record of another schema) raises
:class:`~daemon.errors.EvalDataError`; a problem with one record becomes one
``EvalDataError`` in :attr:`Conversion.errors`, naming the file, the record number and the
source field. A record converts all or nothing: its requests, probes and notes are kept
only when every request it yields passes :func:`store.records.parse_edit_request`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import EditValidationError, EvalDataError
from store.records import EditSource, RequestLimits, SourceKind, parse_edit_request

MAX_LIST_ITEMS = RequestLimits().max_list_items
_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class MultiHopProbe:
    """A multi-hop question (MQuAKE) that several edits together should make true.

    Not an edit request: score it once every request in ``edit_ids`` is applied, by
    whether the model's answer to ``prompt`` matches one of ``answers`` (the new answer
    first, then its aliases). ``old_answers`` is the pre-edit answer and its aliases.
    """

    id: str
    prompt: str
    answers: tuple[str, ...]
    old_answers: tuple[str, ...]
    edit_ids: tuple[str, ...]

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object form (lists for the tuples)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "answers": list(self.answers),
            "old_answers": list(self.old_answers),
            "edit_ids": list(self.edit_ids),
        }


@dataclass(frozen=True)
class Conversion:
    """The outcome of converting one benchmark file.

    ``records`` counts the input records read (after ``limit``); each either yielded its
    requests (and probes) or exactly one entry in ``errors``. ``notes`` counts
    adjustments made to records that did convert (e.g. ``subject_not_in_prompt``).
    """

    requests: tuple[dict[str, Any], ...]
    errors: tuple[EvalDataError, ...]
    probes: tuple[MultiHopProbe, ...] = ()
    notes: Mapping[str, int] = field(default_factory=dict)
    records: int = 0


def kind(value: object) -> str:
    """A JSON-ish description of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "a number", float: "a number", list: "an array"}
    return "an object" if isinstance(value, dict) else names.get(type(value), type(value).__name__)


def read_json(path: Path) -> object:
    """The decoded JSON of ``path`` (a ``.jsonl`` file gives a list of its lines' values)."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EvalDataError(f"cannot read: {exc.strerror or exc}", path=name) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"not valid UTF-8 (bad byte at offset {exc.start})", path=name) from exc
    if path.suffix == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()]
        return [_loads(line, name, number) for number, line in enumerate(lines, start=1)]
    return _loads(text, name, None)


def _loads(text: str, name: str, record: int | None) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise EvalDataError(reason, path=name, record=record) from exc
    except RecursionError as exc:
        raise EvalDataError("not valid JSON: nested too deeply", path=name, record=record) from exc


def has_keys(data: object, keys: Sequence[str]) -> bool:
    """Whether ``data`` is a non-empty array whose first record has all of ``keys``."""
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and all(k in data[0] for k in keys)
    )


def record_array(path: Path, data: object, keys: Sequence[str], fmt: str) -> list[object]:
    """``data`` as a record array whose first record has ``keys``, else raise naming the field."""
    if not isinstance(data, list):
        raise EvalDataError(
            f"top level must be an array of {fmt} records, got {kind(data)}", path=str(path)
        )
    if not data:
        raise EvalDataError("holds no records", path=str(path))
    first = Record(path, 1, data[0])
    for key in keys:
        if key not in first.raw:
            found = ", ".join(sorted(first.raw)) or "none"
            raise first.error(key, f"is missing: not a {fmt} file (record 1 has keys: {found})")
    return data


class Record:
    """One raw record (or a nested object in it) with typed, located field access."""

    def __init__(self, path: Path, number: int, raw: object, prefix: str = "") -> None:
        self.path, self.number, self.prefix = path, number, prefix
        if not isinstance(raw, dict):
            raise self.error(None, f"must be a JSON object, got {kind(raw)}")
        self.raw: dict[str, object] = raw

    def error(self, name: str | None, reason: str) -> EvalDataError:
        """An error located at field ``name`` of this record (``None``: the object itself)."""
        where = (self.prefix.rstrip(".") or None) if name is None else self.prefix + name
        return EvalDataError(reason, path=str(self.path), record=self.number, field=where)

    def child(self, name: str, raw: object) -> Record:
        """The nested object ``raw``, found at field ``name`` of this one."""
        return Record(self.path, self.number, raw, prefix=f"{self.prefix}{name}.")

    def get(self, name: str) -> object:
        """The field's value; raises when it is absent."""
        if name not in self.raw:
            raise self.error(name, "is missing")
        return self.raw[name]

    def text(self, name: str) -> str:
        """A required string field."""
        value = self.get(name)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {kind(value)}")
        return value

    def optional_text(self, name: str) -> str | None:
        """A string field that may be absent or null."""
        return None if self.raw.get(name) is None else self.text(name)

    def integer(self, name: str) -> int:
        """A required integer field."""
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {kind(value)}")
        return value

    def mapping(self, name: str) -> dict[str, object]:
        """A required object field."""
        value = self.get(name)
        if not isinstance(value, dict):
            raise self.error(name, f"must be an object, got {kind(value)}")
        return value

    def array(self, name: str) -> list[object]:
        """A required array field."""
        value = self.get(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be an array, got {kind(value)}")
        return value

    def texts(self, name: str) -> list[str]:
        """A required array of non-blank strings (absent or null: an empty list)."""
        if self.raw.get(name) is None:
            return []
        values = self.array(name)
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise self.error(f"{name}[{i}]", f"must be a non-blank string, got {kind(value)}")
        return [v for v in values if isinstance(v, str)]

    def first_text(self, name: str) -> str | None:
        """The answer in a string, an array of strings or an array of alias arrays.

        The first string found depth-first; ``None`` when the array is empty.
        """
        value = self.get(name)
        while isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value
        if value == []:
            return None
        raise self.error(name, f"must be a string or an array of strings, got {kind(value)}")


Converted = tuple[list[dict[str, Any]], list[MultiHopProbe]]
"""What a per-record converter returns: unvalidated request dicts and probes."""


class Builder:
    """Runs a per-record converter over a record array and collects a :class:`Conversion`.

    ``field_map`` maps editd request fields (indices removed, e.g. ``locality.target``)
    to the source fields they came from, so validation errors name the source field.
    """

    def __init__(self, path: Path, dataset: str, id_prefix: str, field_map: Mapping[str, str]):
        self.path, self.dataset, self.id_prefix = path, dataset, id_prefix
        self.field_map = field_map
        self.requests: list[dict[str, Any]] = []
        self.errors: list[EvalDataError] = []
        self.probes: list[MultiHopProbe] = []
        self.notes: Counter[str] = Counter()
        self.records = 0
        self._pending: Counter[str] = Counter()
        self._ids: set[str] = set()

    def note(self, key: str, count: int = 1) -> None:
        """Count an adjustment to the current record (kept only if the record converts)."""
        self._pending[key] += count

    def target(self, text: str) -> str:
        """``text`` as a continuation: one leading space, no outer whitespace ("" if blank)."""
        stripped = text.strip()
        if stripped != text:
            self.note("whitespace_trimmed")
        return " " + stripped if stripped else ""

    def subject(self, prompt: str, subject: str | None) -> str | None:
        """``subject`` when it occurs in ``prompt``; otherwise ``None``, counted in the notes."""
        if subject is None or subject in prompt:
            return subject
        self.note("subject_not_in_prompt")
        return None

    def request(self, key: str, item_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """An editd request dict with id ``<id_prefix>-<key>`` and an eval source."""
        source = {"kind": SourceKind.EVAL.value, "url": self.dataset, "item_id": item_id or key}
        out = {"id": f"{self.id_prefix}-{key}", **fields, "source": source}
        return {k: v for k, v in out.items() if v not in (None, [], ())}

    def run(
        self,
        items: Sequence[object],
        limit: int | None,
        convert: Callable[[Builder, Record], Converted],
        prefix: str = "",
    ) -> Conversion:
        """Convert the first ``limit`` records of ``items`` (all when ``None``)."""
        for number, raw in enumerate(items[:limit] if limit is not None else items, start=1):
            self.records += 1
            self._pending.clear()
            try:
                record = Record(self.path, number, raw, prefix)
                requests, probes = convert(self, record)
                validated = self._validate(record, requests)
            except EvalDataError as exc:
                self.errors.append(exc)
                continue
            self.requests.extend(validated)
            self.probes.extend(probes)
            self.notes.update(self._pending)
        return self.result()

    def result(self) -> Conversion:
        """What has been collected so far."""
        return Conversion(
            tuple(self.requests),
            tuple(self.errors),
            tuple(self.probes),
            dict(self.notes),
            self.records,
        )

    def _validate(self, record: Record, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for obj in requests:
            try:
                request = parse_edit_request(obj, default_source=EditSource(SourceKind.EVAL))
            except EditValidationError as exc:
                where = f" (request field '{exc.field}')" if exc.field else ""
                reason = f"not a valid edit request{where}: {exc.reason}"
                raise record.error(self._source_field(exc.field), reason) from exc
            out.append(request.to_json_dict())
        ids = [str(r["id"]) for r in out]
        for i, edit_id in enumerate(ids):
            if edit_id in self._ids or edit_id in ids[:i]:
                raise record.error(self.field_map.get("id"), f"duplicate request id {edit_id!r}")
        self._ids.update(ids)
        return out

    def _source_field(self, name: str | None) -> str | None:
        if name is None:
            return None
        plain = _INDEX.sub("", name)
        return self.field_map.get(plain) or self.field_map.get(plain.split(".")[0]) or name
