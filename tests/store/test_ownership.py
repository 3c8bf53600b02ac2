"""Who may supersede or retract an edit: operators anything, a feed only its own edits."""

from __future__ import annotations

import pytest

from daemon.errors import SupersedeNotAllowedError
from store import editlog
from store import feeds as feed_store
from store.db import Store
from store.ownership import Origin, check_may_replace, origin_of
from store.queue import EditQueue
from store.schema import SourceKind
from tests.store.helpers import request


def feed_edit(store: Store, feed: str, n: int, *, created: bool = True) -> str:
    """An edit submitted by ``feed``'s item ``item-n``, with the poller's provenance event."""
    result = EditQueue(store).submit(request(n), source_kind=SourceKind.FEED)
    data = {"feed": feed, "item_id": f"item-{n}", "slot": "fact_edit", "created": created}
    editlog.append(store, feed_store.ITEM_EDIT_EVENT, edit_id=result.id, data=data)
    return result.id


def test_origin_is_the_intake_channel_and_the_feed_that_created_the_edit(store: Store) -> None:
    """The channel comes from the row (not the request's ``source`` claim); a feed edit's
    feed from its creating item's event; an unknown id has no origin."""
    queue = EditQueue(store)
    api = queue.submit(request(1, source={"kind": "feed", "url": "http://x/f"})).id
    spool = queue.submit(request(2), source_kind=SourceKind.SPOOL).id
    news = feed_edit(store, "news", 3)
    assert origin_of(store, api) == Origin(SourceKind.API)
    assert origin_of(store, spool) == Origin(SourceKind.SPOOL)
    assert origin_of(store, news) == Origin(SourceKind.FEED, "news")
    assert origin_of(store, "no-such-edit") is None


def test_operators_may_replace_anything_feeds_only_their_own(store: Store) -> None:
    """api and cli replace any edit; a feed its own edits only; spool only spool edits."""
    queue = EditQueue(store)
    api = queue.submit(request(1)).id
    spool = queue.submit(request(2), source_kind=SourceKind.SPOOL).id
    news, sport = feed_edit(store, "news", 3), feed_edit(store, "sport", 4)
    for operator in (Origin(SourceKind.API), Origin(SourceKind.CLI)):
        for target in (api, spool, news, sport, "no-such-edit"):
            check_may_replace(store, operator, target)
    check_may_replace(store, Origin(SourceKind.FEED, "news"), news)
    check_may_replace(store, Origin(SourceKind.SPOOL), spool)
    refused = [
        (Origin(SourceKind.FEED, "news"), sport, "feed 'sport'"),
        (Origin(SourceKind.FEED, "news"), api, "the api"),
        (Origin(SourceKind.FEED, "news"), "no-such-edit", "is unknown"),
        (Origin(SourceKind.SPOOL), api, "the api"),
        (Origin(SourceKind.FEED, None), news, "feed 'news'"),
    ]
    for by, target, owner in refused:
        with pytest.raises(SupersedeNotAllowedError) as info:
            check_may_replace(store, by, target)
        assert owner in str(info.value) and info.value.field == "supersedes"
        assert info.value.context["target"] == target


def test_an_item_deduplicated_into_an_edit_does_not_own_it(store: Store) -> None:
    """A feed whose request matched an existing edit (``created`` false) did not make it."""
    api = EditQueue(store).submit(request(1)).id
    data = {"feed": "news", "item_id": "a", "slot": "fact_edit", "created": False}
    editlog.append(store, feed_store.ITEM_EDIT_EVENT, edit_id=api, data=data)
    assert feed_store.item_origin(store, api) is None
    with pytest.raises(SupersedeNotAllowedError):
        check_may_replace(store, Origin(SourceKind.FEED, "news"), api)
