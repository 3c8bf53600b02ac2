"""Validation of edit requests at the boundary, with field-named errors.

Every check raises :class:`~daemon.errors.EditValidationError` whose ``field``
names the offending field (``prompt``, ``rephrases[2]``, ``locality[0].target``,
``source.kind``); nothing else escapes these functions for any input.
Import them through :mod:`store.records`.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import IO, TypeVar

from daemon.errors import EditValidationError, SubjectNotFoundError
from store.schema import (
    REQUEST_FIELDS,
    SOURCE_FIELDS,
    Backend,
    EditKind,
    EditRequest,
    EditSource,
    LocalityProbe,
    RequestLimits,
    Schedule,
    Scope,
    SourceKind,
    canonical_json,
)

_E = TypeVar("_E", bound=Enum)

_DEFAULT_LIMITS = RequestLimits()
_DEFAULT_SOURCE = EditSource(kind=SourceKind.API)
# C0 and C1 control characters except tab, newline and carriage return; lone surrogates.
_BAD_TEXT_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Identifiers additionally exclude every whitespace character.
_BAD_ID_CHAR = re.compile("[\\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_PROBE_FIELDS = frozenset({"prompt", "target"})


def parse_edit_request(
    obj: object,
    *,
    limits: RequestLimits = _DEFAULT_LIMITS,
    default_source: EditSource | None = None,
) -> EditRequest:
    """Validate a decoded JSON value and build the :class:`EditRequest` it describes.

    ``default_source`` is used when the object has no ``source`` (defaults to kind
    ``api``). ``null`` counts as absent for every optional field.
    """
    if not isinstance(obj, Mapping):
        raise EditValidationError(f"an edit request must be a JSON object, got {_kind(obj)}")
    _check_fields(obj, REQUEST_FIELDS, "")
    kind = _enum(obj.get("kind"), "kind", EditKind, EditKind.FACT)
    scope = _enum(obj.get("scope"), "scope", Scope, Scope.PROMPT)
    if scope is not Scope.PROMPT and kind is not EditKind.FORGET:
        raise EditValidationError(
            f"{scope.value!r} applies only to kind 'forget' (this request is {kind.value!r})",
            field="scope",
        )
    prompt = _required_text(obj, "prompt", limits.max_prompt_chars)
    subject = _subject(obj.get("subject"), prompt, limits.max_prompt_chars)
    if kind is EditKind.FORGET:
        if subject is None:
            raise EditValidationError(
                "is required for kind 'forget' (whom or what to stop revealing)", field="subject"
            )
        target = _optional_text(obj.get("target"), "target", limits.max_target_chars)
        target = limits.withheld_answer if target is None else target
    else:
        target = _required_text(obj, "target", limits.max_target_chars)
    request = EditRequest(
        prompt=prompt,
        target=target,
        id=_optional_ident(obj.get("id"), "id", limits.max_id_chars),
        subject=subject,
        relation=_optional_text(obj.get("relation"), "relation", limits.max_relation_chars),
        rephrases=_text_list(obj.get("rephrases"), "rephrases", limits),
        heldout_rephrases=_text_list(obj.get("heldout_rephrases"), "heldout_rephrases", limits),
        locality=_locality(obj.get("locality"), limits),
        target_true=_optional_text(obj.get("target_true"), "target_true", limits.max_target_chars),
        backend=_backend(obj.get("backend"), limits),
        schedule=_enum(obj.get("schedule"), "schedule", Schedule, Schedule.NOW),
        supersedes=_optional_ident(obj.get("supersedes"), "supersedes", limits.max_id_chars),
        source=_source(obj.get("source"), limits, default_source or _DEFAULT_SOURCE),
        kind=kind,
        scope=scope,
    )
    size = len(canonical_json(request.to_json_dict()).encode("utf-8"))
    if size > limits.max_request_bytes:
        raise EditValidationError(
            f"request is too large ({size} bytes; the limit is {limits.max_request_bytes})"
        )
    return request


def parse_edit_json(
    data: str | bytes | bytearray,
    *,
    limits: RequestLimits = _DEFAULT_LIMITS,
    default_source: EditSource | None = None,
    record: int | None = None,
    source: str | None = None,
) -> EditRequest:
    """Decode one JSON document (strict UTF-8 when bytes) and validate it.

    ``record`` and ``source`` (a line number and a file name) are attached to errors.
    """
    try:
        obj = _decode_json(data, limits.max_request_bytes)
        return parse_edit_request(obj, limits=limits, default_source=default_source)
    except EditValidationError as exc:
        if record is None and source is None:
            raise
        raise type(exc)(exc.reason, field=exc.field, record=record, source=source) from exc


def iter_jsonl(
    data: bytes | Path,
    *,
    limits: RequestLimits = _DEFAULT_LIMITS,
    default_source: EditSource | None = None,
    source_name: str | None = None,
) -> Iterator[tuple[int, EditRequest | EditValidationError]]:
    """Yield ``(line_number, request_or_error)`` for each non-blank line, numbered from 1.

    Errors are yielded, not raised, and carry ``record`` (the line number) and
    ``source`` (``source_name``, else the file's path). A file that cannot be
    read at all raises :class:`EditValidationError`.
    """
    name: str | None
    if isinstance(data, Path):
        name = source_name if source_name is not None else str(data)
        try:
            stream: IO[bytes] = data.open("rb")
        except OSError as exc:
            raise EditValidationError(f"cannot read: {exc.strerror}", source=name) from exc
    else:
        name, stream = source_name, io.BytesIO(data)
    with stream:
        yield from _iter_lines(stream, limits, default_source, name)


def _iter_lines(
    stream: IO[bytes],
    limits: RequestLimits,
    default_source: EditSource | None,
    name: str | None,
) -> Iterator[tuple[int, EditRequest | EditValidationError]]:
    for lineno, line in enumerate(_bounded_lines(stream, limits.max_request_bytes), start=1):
        if line is None:
            reason = f"line is too large (over {limits.max_request_bytes} bytes)"
            yield lineno, EditValidationError(reason, record=lineno, source=name)
            continue
        if not line.strip():
            continue
        try:
            yield (
                lineno,
                parse_edit_json(
                    line, limits=limits, default_source=default_source, record=lineno, source=name
                ),
            )
        except EditValidationError as exc:
            yield lineno, exc


def _bounded_lines(stream: IO[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """Lines without their end-of-line bytes; ``None`` for a line over ``max_bytes``."""
    cap = max_bytes + 2  # room for "\r\n"
    while line := stream.readline(cap):
        if len(line) == cap and not line.endswith(b"\n"):
            while (rest := stream.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line.rstrip(b"\r\n")


def _decode_json(data: object, max_bytes: int) -> object:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if isinstance(data, bytes):
        _check_bytes(len(data), max_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EditValidationError(f"not valid UTF-8 at byte {exc.start}") from exc
    elif isinstance(data, str):
        _check_bytes(len(data.encode("utf-8", "surrogatepass")), max_bytes)
        text = data
    else:
        raise EditValidationError(f"expected JSON text (str or bytes), got {type(data).__name__}")
    try:
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise EditValidationError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except RecursionError as exc:
        raise EditValidationError("invalid JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal with too many digits
        raise EditValidationError(f"invalid JSON: {exc}") from exc


def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise EditValidationError(f"request is too large ({size} bytes; the limit is {max_bytes})")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise EditValidationError(f"duplicate field {_show(key)}")
        out[key] = value
    return out


def _check_fields(obj: Mapping[object, object], allowed: frozenset[str], prefix: str) -> None:
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        where = prefix.rstrip(".") or None
        raise EditValidationError(
            f"field names must be strings, got {_show(bad_keys[0])}", field=where
        )
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        names = ", ".join(_show(k) for k in unknown[:10])
        raise EditValidationError(
            f"unknown field(s) {names}; allowed: {', '.join(sorted(allowed))}",
            field=prefix + _safe_name(unknown[0]),
        )


def _required_text(
    obj: Mapping[object, object], key: str, max_chars: int, name: str | None = None
) -> str:
    value = obj.get(key)
    if value is None:
        raise EditValidationError("is required", field=name or key)
    return _text(value, name or key, max_chars)


def _optional_text(value: object, name: str, max_chars: int) -> str | None:
    return None if value is None else _text(value, name, max_chars)


def _text(value: object, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise EditValidationError(f"must be a string, got {_kind(value)}", field=name)
    if len(value) > max_chars:
        raise EditValidationError(
            f"is too long ({len(value)} characters; the limit is {max_chars})", field=name
        )
    if not value.strip():
        raise EditValidationError("must not be empty or whitespace only", field=name)
    bad = _BAD_TEXT_CHAR.search(value)
    if bad is not None:
        raise EditValidationError(_bad_char_message(bad), field=name)
    return value


def _optional_ident(value: object, name: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EditValidationError(f"must be a string, got {_kind(value)}", field=name)
    if not value:
        raise EditValidationError("must not be empty", field=name)
    if len(value) > max_chars:
        raise EditValidationError(
            f"is too long ({len(value)} characters; the limit is {max_chars})", field=name
        )
    bad = _BAD_ID_CHAR.search(value)
    if bad is not None:
        raise EditValidationError(
            _bad_char_message(bad) + " (identifiers allow no whitespace or control characters)",
            field=name,
        )
    return value


def _bad_char_message(match: re.Match[str]) -> str:
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        what = "a lone surrogate"
    elif unicodedata.category(char) == "Cc":
        what = "a control character"
    else:
        what = "whitespace"
    return f"contains {what} (U+{ord(char):04X}) at position {match.start()}"


def _subject(value: object, prompt: str, max_chars: int) -> str | None:
    subject = _optional_text(value, "subject", max_chars)
    if subject is not None and subject not in prompt:
        raise SubjectNotFoundError(
            f"{_show(subject)} does not occur in the prompt {_show(prompt)}", field="subject"
        )
    return subject


def _text_list(value: object, name: str, limits: RequestLimits) -> tuple[str, ...]:
    items = _list(value, name, limits.max_list_items, "strings")
    return tuple(
        _text(item, f"{name}[{i}]", limits.max_prompt_chars) for i, item in enumerate(items)
    )


def _list(value: object, name: str, max_items: int, of: str) -> list[object] | tuple[object, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise EditValidationError(f"must be a list of {of}, got {_kind(value)}", field=name)
    if len(value) > max_items:
        raise EditValidationError(
            f"has too many items ({len(value)}; the limit is {max_items})", field=name
        )
    return value


def _locality(value: object, limits: RequestLimits) -> tuple[LocalityProbe, ...]:
    items = _list(value, "locality", limits.max_list_items, "{prompt, target} objects")
    return tuple(_probe(item, f"locality[{i}]", limits) for i, item in enumerate(items))


def _probe(item: object, name: str, limits: RequestLimits) -> LocalityProbe:
    if not isinstance(item, Mapping):
        raise EditValidationError(
            f"must be an object with 'prompt' and 'target', got {_kind(item)}", field=name
        )
    _check_fields(item, _PROBE_FIELDS, f"{name}.")
    return LocalityProbe(
        prompt=_required_text(item, "prompt", limits.max_prompt_chars, f"{name}.prompt"),
        target=_required_text(item, "target", limits.max_target_chars, f"{name}.target"),
    )


def _backend(value: object, limits: RequestLimits) -> Backend:
    if value is None:
        return Backend.AUTO
    allowed = ("auto", *limits.backends)
    if isinstance(value, str) and (value in allowed if limits.backends else value != ""):
        try:
            return Backend(value)
        except ValueError as exc:
            raise EditValidationError(str(exc), field="backend") from None
    if limits.backends:
        shown = ", ".join(repr(b) for b in allowed)
        raise EditValidationError(f"must be one of {shown}, got {_show(value)}", field="backend")
    raise EditValidationError(f"must be a back-end name, got {_show(value)}", field="backend")


def _enum(value: object, name: str, cls: type[_E], default: _E) -> _E:
    if value is None:
        return default
    allowed = ", ".join(repr(member.value) for member in cls)
    if isinstance(value, str):
        for member in cls:
            if member.value == value:
                return member
    raise EditValidationError(f"must be one of {allowed}, got {_show(value)}", field=name)


def _source(value: object, limits: RequestLimits, default: EditSource) -> EditSource:
    if value is None:
        return default
    if not isinstance(value, Mapping):
        raise EditValidationError(f"must be an object, got {_kind(value)}", field="source")
    _check_fields(value, SOURCE_FIELDS, "source.")
    if value.get("kind") is None:
        raise EditValidationError("is required", field="source.kind")
    return EditSource(
        kind=_enum(value.get("kind"), "source.kind", SourceKind, SourceKind.API),
        url=_optional_ident(value.get("url"), "source.url", limits.max_url_chars),
        item_id=_optional_text(value.get("item_id"), "source.item_id", limits.max_url_chars),
    )


def _kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _show(value: object, limit: int = 60) -> str:
    """A short, printable, storable rendering of a user-supplied value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_name(name: str) -> str:
    """A field name as given, or escaped when it holds unprintable characters."""
    return name if name.isprintable() and len(name) <= 60 else ascii(name)[1:-1][:60]
