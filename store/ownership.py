"""Who may supersede or retract an edit: a source replaces only the edits it made.

An edit's *origin* is the channel it came in through (``edits.source_kind``) and,
for a feed, the feed whose item created it (:func:`store.feeds.item_origin`; the
``source`` object inside a request is the client's claim and is not trusted here).

- ``api`` and ``cli`` are the operator (the holder of the API token, or a shell on
  the host that can open the store): they may supersede or retract any edit;
- a ``feed`` may supersede or retract only the edits that same feed created;
- ``spool`` and ``eval`` may supersede only edits of their own kind.

The poller checks a feed's ``supersedes`` and ``op: retract`` at intake; the worker
checks every ``supersedes`` again before it applies the edit, and checks the
earlier edits an editor replaced on its own (the hook merges edits of one fact).
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.errors import SupersedeNotAllowedError
from store import edits
from store.db import Store
from store.feeds import item_origin
from store.schema import SourceKind

OPERATOR_KINDS: frozenset[SourceKind] = frozenset({SourceKind.API, SourceKind.CLI})
"""Channels that act for the operator: they may replace any edit."""


@dataclass(frozen=True)
class Origin:
    """Where an edit came from: the intake channel and, for a feed, which feed."""

    kind: SourceKind
    feed: str | None = None

    def __str__(self) -> str:
        return f"feed '{self.feed}'" if self.kind is SourceKind.FEED else f"the {self.kind.value}"

    def may_replace(self, owner: Origin | None) -> bool:
        """Whether this source may supersede or retract an edit made by ``owner``."""
        if self.kind in OPERATOR_KINDS:
            return True
        known = self.kind is not SourceKind.FEED or self.feed is not None
        return known and owner == self


def origin_of(store: Store, edit_id: str) -> Origin | None:
    """The origin of ``edit_id``, or ``None`` for an unknown id."""
    with store.read() as db:
        record = edits.fetch(db, edit_id)
        if record is None:
            return None
        kind = SourceKind(record.source_kind)
        if kind is not SourceKind.FEED:
            return Origin(kind)
        item = item_origin(store, edit_id)
        return Origin(kind, None if item is None else item.feed)


def check_may_replace(store: Store, by: Origin, target: str) -> None:
    """Raise :class:`SupersedeNotAllowedError` unless ``by`` may replace edit ``target``."""
    if by.kind in OPERATOR_KINDS:
        return
    owner = origin_of(store, target)
    if not by.may_replace(owner):
        raise SupersedeNotAllowedError(target, str(by), None if owner is None else str(owner))
