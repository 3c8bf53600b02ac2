"""Feed state: the configured feeds, their HTTP cache validators, and items seen."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from daemon.errors import RecordNotFoundError
from store.db import Store

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class FeedStatus(StrEnum):
    """``error`` means the last poll failed (see ``last_error``); ``paused`` is never polled."""

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

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly form for the API and CLI."""
        return {**self.__dict__, "status": self.status.value}


@dataclass(frozen=True)
class FeedItem:
    """One item seen in a feed, and the edit it became (if any)."""

    feed: str
    item_id: str
    content_hash: str | None
    edit_id: str | None
    seen_at: float


def upsert_feed(
    store: Store,
    name: str,
    url: str,
    *,
    interval_s: float = 3600.0,
    status: FeedStatus | str = FeedStatus.ACTIVE,
) -> Feed:
    """Add a feed or change its URL, interval or status (validators reset on a new URL)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"feed name must be 1-100 of [A-Za-z0-9_.-], got {name!r}")
    if not url.strip() or not interval_s > 0:
        raise ValueError(f"feed needs a URL and a positive interval, got {url!r}, {interval_s}")
    with store.write() as db:
        db.execute(
            "INSERT INTO feeds (name, url, interval_s, status) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET "
            "etag = CASE WHEN url = excluded.url THEN etag END, "
            "last_modified = CASE WHEN url = excluded.url THEN last_modified END, "
            "url = excluded.url, interval_s = excluded.interval_s, status = excluded.status",
            [name, url, float(interval_s), FeedStatus(status).value],
        )
        return get_feed(store, name)


def record_feed_poll(
    store: Store,
    name: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    error: str | None = None,
) -> Feed:
    """Note a poll: new cache validators on success, ``error`` status and reason on failure."""
    with store.write() as db:
        feed = get_feed(store, name)
        status: FeedStatus
        if error is None:
            status = FeedStatus.ACTIVE if feed.status is FeedStatus.ERROR else feed.status
            sql = "UPDATE feeds SET etag = ?, last_modified = ?, last_error = NULL, "
            params: list[Any] = [etag, last_modified]
        else:
            status = FeedStatus.PAUSED if feed.status is FeedStatus.PAUSED else FeedStatus.ERROR
            sql, params = "UPDATE feeds SET last_error = ?, ", [error]
        db.execute(
            sql + "status = ?, last_polled_at = ? WHERE name = ?",
            [*params, status.value, store.now(), name],
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


def remove_feed(store: Store, name: str) -> bool:
    """Delete a feed and its seen items; ``False`` if there was none."""
    with store.write() as db:
        return db.execute("DELETE FROM feeds WHERE name = ?", [name]).rowcount > 0


def record_feed_item(
    store: Store,
    feed: str,
    item_id: str,
    *,
    content_hash: str | None = None,
    edit_id: str | None = None,
) -> bool:
    """Remember an item of ``feed``; ``True`` if it is new, ``False`` if seen before."""
    with store.write() as db:
        get_feed(store, feed)
        cursor = db.execute(
            "INSERT OR IGNORE INTO feed_items (feed, item_id, content_hash, edit_id, seen_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [feed, item_id, content_hash, edit_id, store.now()],
        )
        return cursor.rowcount > 0


def get_feed_item(store: Store, feed: str, item_id: str) -> FeedItem | None:
    """The remembered item, or ``None`` if the feed never showed it."""
    with store.read() as db:
        for row in db.query(
            "SELECT * FROM feed_items WHERE feed = ? AND item_id = ?", [feed, item_id]
        ):
            return FeedItem(**row)
    return None


def _feed(row: dict[str, Any]) -> Feed:
    return Feed(**{**row, "status": FeedStatus(row["status"])})
