"""The edit request schema and its validation, shared by every source.

API, CLI, feeds, the nightly spool and evaluation all turn their input into an
:class:`EditRequest` with :func:`parse_edit_request`, :func:`parse_edit_json` or
:func:`iter_jsonl`, so one set of rules decides what a valid edit is.

The types live in :mod:`store.schema` and the checks in :mod:`store.validation`
(split so that neither module imports the other in a cycle); import both from here.
See :data:`ALLOWED_TRANSITIONS` in :mod:`store.schema` for the edit life cycle.
"""

from __future__ import annotations

from store.schema import (
    ALLOWED_TRANSITIONS,
    LIVE_STATUSES,
    REQUEST_FIELDS,
    SOURCE_FIELDS,
    Backend,
    EditKind,
    EditRequest,
    EditSource,
    EditStatus,
    LocalityProbe,
    RequestLimits,
    Schedule,
    Scope,
    SourceKind,
    can_transition,
    canonical_json,
)
from store.validation import iter_jsonl, parse_edit_json, parse_edit_request

__all__ = [
    "ALLOWED_TRANSITIONS",
    "LIVE_STATUSES",
    "REQUEST_FIELDS",
    "SOURCE_FIELDS",
    "Backend",
    "EditKind",
    "EditRequest",
    "EditSource",
    "EditStatus",
    "LocalityProbe",
    "RequestLimits",
    "Schedule",
    "Scope",
    "SourceKind",
    "can_transition",
    "canonical_json",
    "iter_jsonl",
    "parse_edit_json",
    "parse_edit_request",
]
