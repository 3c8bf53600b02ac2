"""Feed state: the configured feeds, their HTTP cache validators, and the items seen.

A feed's row carries what the next poll needs (URL, ``ETag``/``Last-Modified``,
when it is due, how many polls in a row failed) and what an operator wants to see
(status and the last error). An item is remembered by ``(feed, item_id)`` with its
content hash, so an unchanged item is skipped and a changed one is recognised; the
edits an item produced are kept per *slot* (``fact_edit`` for the extension, or an
extractor's relation and subject) with the extractor and the text it matched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from daemon.errors import RecordNotFoundError
from store.db import Store

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

ITEM_EDIT_EVENT = "feed_item_edit"
"""The event the poller appends for every request an item submits (with its provenance)."""


class FeedStatus(StrEnum):
    """``error``: the last poll failed (see ``last_error``); ``paused``: never polled.

    A feed that answered 410 Gone is ``paused`` with the reason in ``last_error``.
    """

    ACTIVE = "active"
    PAUSED = "paused"
    ERROR = "error"


@dataclass(frozen=True)
class Feed:
    """One row of ``feeds``."""

    name: str
    url: str
    etag: str | None
    last_modified: str | None
    status: FeedStatus
    last_error: str | None
    last_polled_at: float | None
    interval_s: float
    failures: int = 0
    next_poll_at: float | None = None
    added_at: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {**self.__dict__, "status": self.status.value}


@dataclass(frozen=True)
class FeedItem:
    """One item seen in a feed: its content hash, and the reason if it was malformed."""

    feed: str
    item_id: str
    content_hash: str | None
    edit_id: str | None
    seen_at: float
    error: str | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class ItemEdit:
    """An edit an item produced, in one slot of the item, with its provenance."""

    feed: str
    item_id: str
    slot: str
    edit_id: str
    extractor: str
    evidence: str | None
    created_at: float


@dataclass(frozen=True)
class FeedCounts:
    """How many items a feed showed, how many were malformed, how many edits they made."""

    items: int
    malformed: int
    edits: int

    def to_json_dict(self) -> dict[str, int]:
        """A JSON-friendly form."""
        return dict(self.__dict__)


# --- feeds ---------------------------------------------------------------------------


def upsert_feed(
    store: Store,
    name: str,
    url: str,
    *,
    interval_s: float = 3600.0,
    status: FeedStatus | str = FeedStatus.ACTIVE,
) -> Feed:
    """Add a feed or change its URL, interval or status (validators reset on a new URL).

    A changed feed is due at once; its failure count starts again.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"feed name must be 1-100 of [A-Za-z0-9_.-], got {name!r}")
    if not url.strip() or not interval_s > 0:
        raise ValueError(f"feed needs a URL and a positive interval, got {url!r}, {interval_s}")
    with store.write() as db:
        db.execute(
            "INSERT INTO feeds (name, url, interval_s, status, added_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET "
            "etag = CASE WHEN url = excluded.url THEN etag END, "
            "last_modified = CASE WHEN url = excluded.url THEN last_modified END, "
            "url = excluded.url, interval_s = excluded.interval_s, status = excluded.status, "
            "failures = 0, next_poll_at = NULL",
            [name, url, float(interval_s), FeedStatus(status).value, store.now()],
        )
        return get_feed(store, name)


def record_feed_poll(
    store: Store,
    name: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    error: str | None = None,
    url: str | None = None,
    next_poll_at: float | None = None,
) -> Feed:
    """Note a poll: new cache validators on success, ``error`` status and reason on failure.

    ``url`` replaces the stored URL (a permanent redirect); ``next_poll_at`` says when
    the feed is due again (``None``: a full interval from now).
    """
    with store.write() as db:
        feed = get_feed(store, name)
        now = store.now()
        due = now + feed.interval_s if next_poll_at is None else next_poll_at
        status: FeedStatus
        if error is None:
            status = FeedStatus.ACTIVE if feed.status is FeedStatus.ERROR else feed.status
            sql = "UPDATE feeds SET etag = ?, last_modified = ?, last_error = NULL, failures = 0, "
            params: list[Any] = [etag, last_modified]
        else:
            status = FeedStatus.PAUSED if feed.status is FeedStatus.PAUSED else FeedStatus.ERROR
            sql, params = "UPDATE feeds SET last_error = ?, failures = failures + 1, ", [error]
        if url is not None and url != feed.url:
            sql, params = sql + "url = ?, ", [*params, url]
        db.execute(
            sql + "status = ?, last_polled_at = ?, next_poll_at = ? WHERE name = ?",
            [*params, status.value, now, due, name],
        )
        return get_feed(store, name)


def disable_feed(store: Store, name: str, reason: str) -> Feed:
    """Stop polling a feed (``paused``) and say why, e.g. its source answered 410 Gone."""
    with store.write() as db:
        get_feed(store, name)
        db.execute(
            "UPDATE feeds SET status = ?, last_error = ?, last_polled_at = ?, next_poll_at = NULL "
            "WHERE name = ?",
            [FeedStatus.PAUSED.value, reason, store.now(), name],
        )
        return get_feed(store, name)


def get_feed(store: Store, name: str) -> Feed:
    """The feed called ``name``; raises :class:`RecordNotFoundError`."""
    with store.read() as db:
        for row in db.query("SELECT * FROM feeds WHERE name = ?", [name]):
            return _feed(row)
    raise RecordNotFoundError("feed", name)


def list_feeds(store: Store) -> list[Feed]:
    """Every feed, by name."""
    with store.read() as db:
        return [_feed(row) for row in db.query("SELECT * FROM feeds ORDER BY name")]


def due_feeds(store: Store, now: float | None = None) -> list[Feed]:
    """Feeds to poll now: not paused, and never polled or past their next poll time."""
    at = store.now() if now is None else now
    with store.read() as db:
        rows = db.query(
            "SELECT * FROM feeds WHERE status != ? AND (next_poll_at IS NULL OR next_poll_at <= ?) "
            "ORDER BY name",
            [FeedStatus.PAUSED.value, at],
        )
        return [_feed(row) for row in rows]


def remove_feed(store: Store, name: str) -> bool:
    """Delete a feed and its item history; ``False`` if there was none.

    The edits its items produced stay: they are part of the edit log.
    """
    with store.write() as db:
        return db.execute("DELETE FROM feeds WHERE name = ?", [name]).rowcount > 0


def feed_counts(store: Store, name: str) -> FeedCounts:
    """Items, malformed items and edits recorded for ``name``."""
    with store.read() as db:
        items, malformed = db.execute(
            "SELECT COUNT(*), COUNT(error) FROM feed_items WHERE feed = ?", [name]
        ).fetchone()
        edits = db.execute(
            "SELECT COUNT(*) FROM feed_item_edits WHERE feed = ?", [name]
        ).fetchone()[0]
    return FeedCounts(items=int(items), malformed=int(malformed), edits=int(edits))


# --- items ---------------------------------------------------------------------------


def record_feed_item(
    store: Store,
    feed: str,
    item_id: str,
    *,
    content_hash: str | None = None,
    edit_id: str | None = None,
    error: str | None = None,
) -> bool:
    """Remember an item of ``feed``; ``True`` if it is new, ``False`` if seen before.

    A seen item's hash, error and ``updated_at`` are replaced (its first ``seen_at``
    and ``edit_id`` stay).
    """
    with store.write() as db:
        get_feed(store, feed)
        now = store.now()
        cursor = db.execute(
            "INSERT OR IGNORE INTO feed_items "
            "(feed, item_id, content_hash, edit_id, seen_at, error, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [feed, item_id, content_hash, edit_id, now, error, now],
        )
        if cursor.rowcount > 0:
            return True
        db.execute(
            "UPDATE feed_items SET content_hash = ?, error = ?, updated_at = ?, "
            "edit_id = COALESCE(edit_id, ?) WHERE feed = ? AND item_id = ?",
            [content_hash, error, now, edit_id, feed, item_id],
        )
        return False


def get_feed_item(store: Store, feed: str, item_id: str) -> FeedItem | None:
    """The remembered item, or ``None`` if the feed never showed it."""
    with store.read() as db:
        for row in db.query(
            "SELECT * FROM feed_items WHERE feed = ? AND item_id = ?", [feed, item_id]
        ):
            return FeedItem(**row)
    return None


def list_feed_items(store: Store, feed: str, *, malformed_only: bool = False) -> list[FeedItem]:
    """The items of ``feed`` in the order first seen (only the malformed ones, if asked)."""
    where = " AND error IS NOT NULL" if malformed_only else ""
    with store.read() as db:
        rows = db.query(
            f"SELECT * FROM feed_items WHERE feed = ?{where} ORDER BY seen_at, item_id", [feed]
        )
        return [FeedItem(**row) for row in rows]


def set_item_edit(
    store: Store,
    feed: str,
    item_id: str,
    slot: str,
    edit_id: str,
    *,
    extractor: str,
    evidence: str | None = None,
) -> None:
    """Record that ``slot`` of the item now stands for ``edit_id`` (replacing an earlier one)."""
    with store.write() as db:
        db.execute(
            "INSERT INTO feed_item_edits "
            "(feed, item_id, slot, edit_id, extractor, evidence, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (feed, item_id, slot) DO UPDATE SET "
            "edit_id = excluded.edit_id, extractor = excluded.extractor, "
            "evidence = excluded.evidence, created_at = excluded.created_at",
            [feed, item_id, slot, edit_id, extractor, evidence, store.now()],
        )


def remove_item_edit(store: Store, feed: str, item_id: str, slot: str) -> None:
    """Forget ``slot`` of the item (its edit was retracted)."""
    with store.write() as db:
        db.execute(
            "DELETE FROM feed_item_edits WHERE feed = ? AND item_id = ? AND slot = ?",
            [feed, item_id, slot],
        )


def item_edits(store: Store, feed: str, item_id: str) -> dict[str, ItemEdit]:
    """The item's current edits by slot."""
    with store.read() as db:
        rows = db.query(
            "SELECT * FROM feed_item_edits WHERE feed = ? AND item_id = ? ORDER BY slot",
            [feed, item_id],
        )
        return {row["slot"]: ItemEdit(**row) for row in rows}


def provenance_of(store: Store, edit_id: str) -> ItemEdit | None:
    """Which feed item (and extractor) produced ``edit_id``, if a feed did."""
    with store.read() as db:
        for row in db.query("SELECT * FROM feed_item_edits WHERE edit_id = ?", [edit_id]):
            return ItemEdit(**row)
    return None


@dataclass(frozen=True)
class ItemOrigin:
    """The feed item (and slot) whose request created an edit."""

    feed: str
    item_id: str
    slot: str


def item_origin(store: Store, edit_id: str) -> ItemOrigin | None:
    """The feed item that created ``edit_id``, or ``None`` if no feed did.

    Read from the item's ``feed_item_edit`` event, which outlives the slot (a slot
    points at the item's newest edit only). An item whose request was deduplicated
    into an existing edit (``created`` false) did not create that edit.
    """
    with store.read() as db:
        rows = db.execute(
            "SELECT data FROM events WHERE edit_id = ? AND kind = ? ORDER BY id",
            [edit_id, ITEM_EDIT_EVENT],
        ).fetchall()
    for (text,) in rows:
        data = json.loads(text)
        if data.get("created") is True and data.get("status") != "rejected":
            return ItemOrigin(str(data["feed"]), str(data["item_id"]), str(data["slot"]))
    return None


def record_edit_failure(
    store: Store, edit_id: str, reason: str, *, kept: str | None = None
) -> ItemOrigin | None:
    """A feed's edit failed in the worker: its item records why (``error``), and when the
    edit was to replace ``kept`` (an earlier edit of the same item and slot, still in
    force) the slot points at ``kept`` again, so the item's next version replaces the
    edit the model holds. The item's origin, or ``None`` if no feed made ``edit_id``."""
    with store.write() as db:
        origin = item_origin(store, edit_id)
        if origin is None:
            return None
        db.execute(
            "UPDATE feed_items SET error = ?, updated_at = ? WHERE feed = ? AND item_id = ?",
            [reason[:2000], store.now(), origin.feed, origin.item_id],
        )
        if kept is not None and item_origin(store, kept) == origin:
            db.execute(
                "UPDATE feed_item_edits SET edit_id = ? "
                "WHERE feed = ? AND item_id = ? AND slot = ? AND edit_id = ?",
                [kept, origin.feed, origin.item_id, origin.slot, edit_id],
            )
    return origin


def _feed(row: dict[str, Any]) -> Feed:
    return Feed(**{**row, "status": FeedStatus(row["status"])})


def feed_states(store: Store) -> list[dict[str, Any]]:
    """Every feed's row and item counts as JSON objects (for ``editd feeds list`` and the API)."""
    return [
        {**feed.to_json_dict(), **feed_counts(store, feed.name).to_json_dict()}
        for feed in list_feeds(store)
    ]
