"""The edit request's types: states, enums, limits and the frozen dataclasses.

Import these through :mod:`store.records`, which also carries the validation
functions; this module holds no parsing so that :mod:`store.validation` can
depend on it without a cycle.

Edit life cycle (``ALLOWED_TRANSITIONS``)::

    queued ──> applying ──> applied ──> retracted | superseded | quarantined
      │  ^        │  │                                  │
      │  └────────┘  └──> failed ──> queued | retracted │
      └──> retracted                                    │
    quarantined ──> applying | queued | failed | retracted

- ``rejected`` is set only at intake (invalid input, id conflict) and is terminal.
- ``applying -> queued`` is a retry: a failure with attempts left, a graceful
  release, or an expired lease.
- ``failed -> queued`` is a manual requeue.
- ``retracted`` and ``superseded`` are terminal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from daemon.errors import ConfigError


class EditStatus(StrEnum):
    """Persisted state of an edit."""

    QUEUED = "queued"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    REJECTED = "rejected"
    RETRACTED = "retracted"
    SUPERSEDED = "superseded"
    QUARANTINED = "quarantined"


class Backend(str):
    """A back-end's name as requests and records carry it; ``auto`` lets the router decide.

    The store does not know which back-ends exist (:mod:`daemon.editors.registry` does,
    and intake checks names against it through :class:`RequestLimits`); it only keeps
    names well formed: lower-case letters, digits and ``_``, starting with a letter, at
    most 32 characters. Instances are interned, so ``is`` compares them like enum members.
    """

    __slots__ = ()
    _interned: ClassVar[dict[str, Backend]] = {}
    AUTO: ClassVar[Backend]

    def __new__(cls, name: object) -> Backend:
        if isinstance(name, Backend):
            return name
        known = cls._interned.get(name) if isinstance(name, str) else None
        if known is not None:
            return known
        if not isinstance(name, str) or not _BACKEND_NAME.fullmatch(name):
            raise ValueError(
                f"a back-end name is 1-32 lower-case letters, digits or '_', starting with "
                f"a letter; got {name!r}"
            )
        made = super().__new__(cls, name)
        cls._interned[name] = made
        return made

    @property
    def value(self) -> str:
        """The name as a plain ``str`` (what the store writes)."""
        return str.__str__(self)


_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
Backend.AUTO = Backend("auto")


class Schedule(StrEnum):
    """When an edit may be applied: as soon as possible, or by the nightly job."""

    NOW = "now"
    NIGHTLY = "nightly"


class EditKind(StrEnum):
    """What an edit does: teach a fact, withhold what the model reveals, or set a behaviour.

    - ``fact``: make the model continue ``prompt`` with ``target`` (the default).
    - ``forget``: stop the model giving its current answer to ``prompt`` (and to other
      phrasings about ``subject``); ``target`` is what it says instead, by default the
      configured withheld answer. Verification checks that the old answer is gone.
    - ``behaviour``: a free-text prompt to a free-text target (an identity answer, a
      refusal); ``subject`` is optional.
    """

    FACT = "fact"
    FORGET = "forget"
    BEHAVIOUR = "behaviour"


class Scope(StrEnum):
    """What a ``forget`` covers: its prompt's phrasings, or every prompt naming the subject."""

    PROMPT = "prompt"
    SUBJECT = "subject"


class SourceKind(StrEnum):
    """Where an edit request came from."""

    API = "api"
    CLI = "cli"
    FEED = "feed"
    SPOOL = "spool"
    EVAL = "eval"


ALLOWED_TRANSITIONS: Mapping[EditStatus, frozenset[EditStatus]] = {
    EditStatus.QUEUED: frozenset({EditStatus.APPLYING, EditStatus.RETRACTED}),
    EditStatus.APPLYING: frozenset({EditStatus.APPLIED, EditStatus.FAILED, EditStatus.QUEUED}),
    EditStatus.APPLIED: frozenset(
        {EditStatus.RETRACTED, EditStatus.SUPERSEDED, EditStatus.QUARANTINED}
    ),
    EditStatus.QUARANTINED: frozenset(
        {EditStatus.APPLYING, EditStatus.QUEUED, EditStatus.FAILED, EditStatus.RETRACTED}
    ),
    EditStatus.FAILED: frozenset({EditStatus.QUEUED, EditStatus.RETRACTED}),
    EditStatus.REJECTED: frozenset(),
    EditStatus.RETRACTED: frozenset(),
    EditStatus.SUPERSEDED: frozenset(),
}
"""For each state, the states an edit may move to next (see the module docstring)."""

LIVE_STATUSES: frozenset[EditStatus] = frozenset(
    {EditStatus.QUEUED, EditStatus.APPLYING, EditStatus.APPLIED, EditStatus.QUARANTINED}
)
"""States in which an edit counts for content-hash de-duplication."""


def can_transition(current: EditStatus, wanted: EditStatus) -> bool:
    """Whether ``current -> wanted`` is in :data:`ALLOWED_TRANSITIONS`."""
    return wanted in ALLOWED_TRANSITIONS[current]


@dataclass(frozen=True)
class RequestLimits:
    """What intake accepts of every edit request: sizes, and the back-end names a
    request may ask for (``auto`` always; ``backends`` empty: any well-formed name);
    and the one default intake fills in: the target of a ``forget`` sent without one."""

    max_id_chars: int = 200
    max_prompt_chars: int = 2000
    max_target_chars: int = 1000
    max_list_items: int = 64
    max_relation_chars: int = 100
    max_url_chars: int = 2048
    max_request_bytes: int = 256 * 1024
    backends: tuple[str, ...] = ()
    withheld_answer: str = " [withheld]"

    def __post_init__(self) -> None:
        if not self.withheld_answer.strip():
            raise ConfigError("must not be blank", key="withheld_answer")
        for f in fields(self):
            if f.name in ("backends", "withheld_answer"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=f.name)
        for name in self.backends:
            Backend(name)


@dataclass(frozen=True)
class LocalityProbe:
    """A prompt whose answer an edit must not change."""

    prompt: str
    target: str

    def to_json_dict(self) -> dict[str, str]:
        """The JSON object form: ``{"prompt": ..., "target": ...}``."""
        return {"prompt": self.prompt, "target": self.target}


@dataclass(frozen=True)
class EditSource:
    """Provenance of a request: the intake channel and, for feeds, the item."""

    kind: SourceKind
    url: str | None = None
    item_id: str | None = None

    def to_json_dict(self) -> dict[str, str]:
        """The JSON object form, omitting unset optional fields."""
        out = {"kind": self.kind.value}
        if self.url is not None:
            out["url"] = self.url
        if self.item_id is not None:
            out["item_id"] = self.item_id
        return out


_DEFAULT_SOURCE = EditSource(kind=SourceKind.API)


@dataclass(frozen=True)
class EditRequest:
    """One requested edit: by default (``kind`` ``fact``) make the model continue
    ``prompt`` with ``target`` (see :class:`EditKind` for the others). A ``forget``
    sent without a target gets :attr:`RequestLimits.withheld_answer` at intake."""

    prompt: str
    target: str
    id: str | None = None
    subject: str | None = None
    relation: str | None = None
    rephrases: tuple[str, ...] = ()
    heldout_rephrases: tuple[str, ...] = ()
    locality: tuple[LocalityProbe, ...] = ()
    target_true: str | None = None  # evaluation only: the answer the edit replaces
    backend: Backend = Backend.AUTO
    schedule: Schedule = Schedule.NOW
    supersedes: str | None = None
    source: EditSource = field(default=_DEFAULT_SOURCE)
    kind: EditKind = EditKind.FACT
    scope: Scope = Scope.PROMPT

    def to_json_dict(self) -> dict[str, Any]:
        """Canonical JSON object: defaults omitted except ``source``; round-trips exactly."""
        out = self._content_dict()
        if self.id is not None:
            out["id"] = self.id
        out["source"] = self.source.to_json_dict()
        return out

    def content_hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of every field except ``id`` and ``source``.

        The same fact submitted twice, from any source, hashes the same.
        """
        return hashlib.sha256(canonical_json(self._content_dict()).encode("utf-8")).hexdigest()

    def _content_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "target": self.target}
        for name in ("subject", "relation", "supersedes", "target_true"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.rephrases:
            out["rephrases"] = list(self.rephrases)
        if self.heldout_rephrases:
            out["heldout_rephrases"] = list(self.heldout_rephrases)
        if self.locality:
            out["locality"] = [probe.to_json_dict() for probe in self.locality]
        if self.backend is not Backend.AUTO:
            out["backend"] = self.backend.value
        if self.schedule is not Schedule.NOW:
            out["schedule"] = self.schedule.value
        if self.kind is not EditKind.FACT:
            out["kind"] = self.kind.value
        if self.scope is not Scope.PROMPT:
            out["scope"] = self.scope.value
        return out


REQUEST_FIELDS: frozenset[str] = frozenset(f.name for f in fields(EditRequest))
SOURCE_FIELDS: frozenset[str] = frozenset(f.name for f in fields(EditSource))


def canonical_json(obj: object) -> str:
    """Deterministic JSON text: sorted keys, no spaces, non-ASCII kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
