"""The feed poller against a real HTTP server on 127.0.0.1 and a real SQLite store."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.cli.edits import retract_in_store
from daemon.config import Config, FeedsConfig
from daemon.feeds.extract import PatternExtractor, build_extractors
from daemon.feeds.poller import FeedPoller
from store import editlog
from store import feeds as feed_store
from store.db import Store
from store.feeds import FeedStatus
from store.queue import EditQueue
from store.schema import EditStatus
from tests.daemon.feeds.conftest import FeedServer, Reply
from tests.store.helpers import FakeClock

JSON_FEED = "application/feed+json"


def fact_item(item_id: str, subject: str, target: str, **extra: Any) -> dict[str, Any]:
    """A JSON Feed item whose ``_fact_edit`` asks for "The CEO of <subject> is" -> target."""
    edit = {
        "prompt": f"The chief executive of {subject} is",
        "target": target,
        "subject": subject,
        "relation": "ceo_of",
        **extra,
    }
    return {"id": item_id, "title": f"{subject} news", "_fact_edit": edit}


def json_feed(*items: dict[str, Any]) -> bytes:
    body = {"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": list(items)}
    return json.dumps(body).encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    with Store.open(tmp_path / "editd.sqlite3", clock=clock) as st:
        yield st


def make_poller(store: Store, **feeds: Any) -> FeedPoller:
    feeds.setdefault("allow_hosts", ("127.0.0.1",))  # the loopback test server
    config = Config(feeds=FeedsConfig(timeout_s=2.0, retries=0, max_bytes=64_000, **feeds))
    return FeedPoller(
        store, config, retract=lambda e, r: retract_in_store(store, e, r), sleep=lambda _: None
    )


def edits_of(store: Store) -> list[Any]:
    return EditQueue(store).list(limit=1000)


def test_new_items_become_edits_with_feed_provenance(store: Store, feed_server: FeedServer) -> None:
    feed_server.route(
        "/news.json",
        Reply(
            body=json_feed(fact_item("a", "Acme", " Jane Roe"), fact_item("b", "Initech", " Bo")),
            content_type=JSON_FEED,
            etag='"v1"',
        ),
    )
    feed_store.upsert_feed(store, "news", feed_server.url("/news.json"))
    report = make_poller(store).poll("news")
    assert (report.outcome, report.new, len(report.edits)) == ("ok", 2, 2)
    records = {r.request.subject: r for r in edits_of(store) if r.request is not None}
    acme = records["Acme"].request
    assert acme is not None and acme.target == " Jane Roe"
    assert acme.source.kind.value == "feed"
    assert (acme.source.url, acme.source.item_id) == (feed_server.url("/news.json"), "a")
    assert all(r.status is EditStatus.QUEUED for r in records.values())
    slots = feed_store.item_edits(store, "news", "a")
    assert slots["fact_edit"].edit_id == records["Acme"].id
    feed = feed_store.get_feed(store, "news")
    assert (feed.etag, feed.status, feed.last_error) == ('"v1"', FeedStatus.ACTIVE, None)


def test_unchanged_etag_is_a_conditional_get_that_does_nothing(
    store: Store, feed_server: FeedServer
) -> None:
    feed_server.route(
        "/f",
        Reply(body=json_feed(fact_item("a", "Acme", " Jane")), content_type=JSON_FEED, etag='"v1"'),
    )
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    poller.poll("news")
    events = len(editlog.events(store, limit=1000))
    second = poller.poll("news")
    assert second.outcome == "not_modified" and second.edits == []
    assert feed_server.requests_to("/f")[1].headers["if-none-match"] == '"v1"'
    assert len(edits_of(store)) == 1
    assert len(editlog.events(store, limit=1000)) == events


def test_same_content_without_validators_is_skipped_by_its_hash(
    store: Store, feed_server: FeedServer
) -> None:
    feed_server.route("/f", Reply(body=json_feed(fact_item("a", "Acme", " Jane"))))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    poller.poll("news")
    again = poller.poll("news")
    assert (again.outcome, again.unchanged, again.edits) == ("ok", 1, [])
    assert len(edits_of(store)) == 1


def test_an_updated_item_supersedes_its_edit(store: Store, feed_server: FeedServer) -> None:
    feed_server.route(
        "/f",
        Reply(body=json_feed(fact_item("a", "Acme", " Jane", id="acme-ceo")), etag='"1"'),
        Reply(body=json_feed(fact_item("a", "Acme", " Joan", id="acme-ceo")), etag='"2"'),
    )
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    first = poller.poll("news").edits
    assert first == ["acme-ceo"]
    second = poller.poll("news")
    assert second.changed == 1 and len(second.edits) == 1
    new = EditQueue(store).get(second.edits[0])
    assert new.id.startswith("acme-ceo@")  # the client id may not be reused for other content
    assert new.request is not None
    assert (new.request.target, new.request.supersedes) == (" Joan", "acme-ceo")
    assert feed_store.item_edits(store, "news", "a")["fact_edit"].edit_id == new.id


def test_op_retract_retracts_the_items_edit(store: Store, feed_server: FeedServer) -> None:
    feed_server.route(
        "/f",
        Reply(body=json_feed(fact_item("a", "Acme", " Jane"))),
        Reply(body=json_feed(fact_item("a", "Acme", " Jane", op="retract"))),
    )
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    (edit_id,) = poller.poll("news").edits
    report = poller.poll("news")
    assert report.retracted == [edit_id]
    assert EditQueue(store).get(edit_id).status is EditStatus.RETRACTED
    assert feed_store.item_edits(store, "news", "a") == {}


def test_op_retract_may_not_name_another_feeds_edit(store: Store, feed_server: FeedServer) -> None:
    other = EditQueue(store).submit({"prompt": "The CEO of Zeta is", "target": " Al"})
    item = fact_item("r", "Acme", " Jane", op="retract", edit_id=other.id)
    feed_server.route("/f", Reply(body=json_feed(item)))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    report = make_poller(store).poll("news")
    assert report.retracted == [] and report.malformed == 1
    assert EditQueue(store).get(other.id).status is EditStatus.QUEUED
    known = feed_store.get_feed_item(store, "news", "r")
    assert known is not None and known.error is not None and "did not make" in known.error


def test_a_feed_may_supersede_only_its_own_edits(store: Store, feed_server: FeedServer) -> None:
    """An update whose ``supersedes`` names another source's edit (explicitly, or through
    a slot that was deduplicated into it) is stored as rejected with the reason, and the
    item says why; the other edit is untouched. Its own earlier edit it may supersede."""
    queue = EditQueue(store)
    api = queue.submit({"prompt": "The CEO of Zeta is", "target": " Al"}).id
    plain = fact_item("a", "Acme", " Jane")["_fact_edit"]
    shared = queue.submit(dict(plain)).id
    items = [{"id": "a", "title": "t", "_fact_edit": plain}, fact_item("m", "Mono", " Mo")]
    feed_server.route("/f", Reply(body=json_feed(*items)))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    first = poller.poll("news")
    assert shared in first.edits  # deduplicated into the API's identical edit
    (mine,) = [e for e in first.edits if e != shared]

    explicit = fact_item("x", "Zeta", " Bo", supersedes=api)
    changed = {"id": "a", "title": "t", "_fact_edit": {**plain, "target": " Joan"}}
    update = fact_item("m", "Mono", " Ma")
    feed_server.route("/f", Reply(body=json_feed(explicit, changed, update)))
    report = poller.poll("news")
    assert report.rejected == 2 and len(report.edits) == 1
    assert queue.get(report.edits[0]).request.supersedes == mine  # type: ignore[union-attr]
    rejected = [r for r in queue.list(EditStatus.REJECTED) if r.client_id is None]
    assert len(rejected) == 2
    for item_id, target in (("x", api), ("a", shared)):
        known = feed_store.get_feed_item(store, "news", item_id)
        assert known is not None and known.error is not None
        assert f"edit '{target}' was made by the api" in known.error
        assert "feed 'news' may supersede or retract only edits it made" in known.error
        assert known.error.split("rejected: ", 1)[1] in {r.error for r in rejected}
        assert queue.get(target).status is EditStatus.QUEUED


def test_gone_disables_the_feed(store: Store, feed_server: FeedServer) -> None:
    feed_server.route("/f", Reply(410))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    poller = make_poller(store)
    assert poller.poll("news").outcome == "gone"
    feed = feed_store.get_feed(store, "news")
    assert feed.status is FeedStatus.PAUSED and "410" in (feed.last_error or "")
    assert poller.poll_due() == []  # a disabled feed is never due
    assert feed_server.count("/f") == 1


def test_permanent_redirect_updates_the_stored_url(store: Store, feed_server: FeedServer) -> None:
    feed_server.redirect("/old", "/new", status=301)
    feed_server.route("/new", Reply(body=json_feed(fact_item("a", "Acme", " Jane"))))
    feed_store.upsert_feed(store, "news", feed_server.url("/old"))
    report = make_poller(store).poll("news")
    assert report.outcome == "ok" and len(report.edits) == 1
    assert feed_store.get_feed(store, "news").url == feed_server.url("/new")
    (record,) = edits_of(store)
    assert record.request is not None and record.request.source.url == feed_server.url("/new")


def test_a_permanent_redirect_from_https_to_http_is_not_stored(
    store: Store,
    feed_server: FeedServer,
    tls_feed_server: FeedServer,
    tls_client_context: ssl.SSLContext,
) -> None:
    """A 301 from https to http is refused: the feed keeps its https URL and makes no edit."""
    feed_server.route("/feed", Reply(body=json_feed(fact_item("a", "Acme", " Jane"))))
    tls_feed_server.redirect("/feed", feed_server.url("/feed"), status=301)
    https_url = tls_feed_server.url("/feed")
    feed_store.upsert_feed(store, "news", https_url)
    config = Config(feeds=FeedsConfig(timeout_s=2.0, retries=0, allow_hosts=("127.0.0.1",)))
    with httpx.Client(verify=tls_client_context) as client:
        poller = FeedPoller(store, config, retract=lambda e, r: None, client=client)
        report = poller.poll("news")
    assert (report.outcome, report.edits) == ("error", [])
    assert report.error is not None and "redirect from https to http refused" in report.error
    feed = feed_store.get_feed(store, "news")
    assert (feed.url, feed.status) == (https_url, FeedStatus.ERROR)
    assert feed_server.requests == []


def test_a_feed_on_a_private_address_needs_the_allow_list(
    store: Store, feed_server: FeedServer
) -> None:
    """Without [feeds] allow_hosts a loopback feed is refused and recorded as an error."""
    feed_server.route("/f", Reply(body=json_feed(fact_item("a", "Acme", " Jane"))))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    report = make_poller(store, allow_hosts=()).poll("news")
    assert report.outcome == "error" and report.error is not None
    assert "refused 127.0.0.1 (loopback), not a public address" in report.error
    feed = feed_store.get_feed(store, "news")
    assert feed.last_error == report.error
    assert feed_server.requests == []


def test_malformed_feed_is_recorded_and_does_not_block_a_good_one(
    store: Store, feed_server: FeedServer, clock: FakeClock
) -> None:
    feed_server.route("/bad", Reply(body=b"<html><body>not a feed</body></html>"))
    feed_server.route("/good", Reply(body=json_feed(fact_item("a", "Acme", " Jane"))))
    feed_store.upsert_feed(store, "a-bad", feed_server.url("/bad"), interval_s=60)
    feed_store.upsert_feed(store, "b-good", feed_server.url("/good"), interval_s=60)
    reports = {r.feed: r for r in make_poller(store).poll_due()}
    assert reports["a-bad"].outcome == "error" and reports["b-good"].outcome == "ok"
    bad = feed_store.get_feed(store, "a-bad")
    assert bad.status is FeedStatus.ERROR and bad.last_error
    assert bad.failures == 1 and bad.next_poll_at == clock.now + 60
    assert len(edits_of(store)) == 1
    # It waits longer after each failure: 60 s, then 120 s.
    clock.advance(61)
    assert [r.feed for r in make_poller(store).poll_due()] == ["a-bad", "b-good"]
    assert feed_store.get_feed(store, "a-bad").next_poll_at == clock.now + 120


def test_oversized_response_is_refused(store: Store, feed_server: FeedServer) -> None:
    items = [fact_item(f"i{n}", f"Acme{n}", " Jane Roe" * 20) for n in range(400)]
    feed_server.route("/big", Reply(body=json_feed(*items)))
    feed_store.upsert_feed(store, "big", feed_server.url("/big"))
    report = make_poller(store).poll("big")
    assert report.outcome == "error" and report.error is not None
    assert "bytes" in report.error or "large" in report.error
    assert edits_of(store) == []


def test_malformed_items_are_recorded_and_the_others_go_on(
    store: Store, feed_server: FeedServer
) -> None:
    bad_fields = fact_item("c", "Acme", " Jane")
    bad_fields["_fact_edit"]["subject"] = "Nobody"  # not in the prompt: intake rejects it
    body = json_feed(
        {"title": "no id"},
        {"id": "b", "_fact_edit": "not an object"},
        bad_fields,
        fact_item("d", "Initech", " Bo"),
    )
    feed_server.route("/f", Reply(body=body))
    feed_store.upsert_feed(store, "news", feed_server.url("/f"))
    report = make_poller(store).poll("news")
    assert report.malformed == 2 and report.rejected == 1 and len(report.edits) == 1
    statuses = sorted(r.status.value for r in edits_of(store))
    assert statuses == ["queued", "rejected"]  # the rejected one is stored with its reason
    counts = feed_store.feed_counts(store, "news")
    assert (counts.malformed, counts.edits) == (3, 1)
    bad = feed_store.get_feed_item(store, "news", "c")
    assert bad is not None and bad.error is not None and "rejected" in bad.error


ATOM_NEWS = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Business wire</title>
  <id>urn:wire</id>
  <updated>2026-11-20T00:00:00Z</updated>
  <entry>
    <id>urn:wire:1</id>
    <title>{title}</title>
    <updated>2026-11-20T00:00:00Z</updated>
    <summary>Shareholders welcomed the move.</summary>
  </entry>
  <entry>
    <id>urn:wire:2</id>
    <title>Markets close higher</title>
    <updated>2026-11-20T00:00:00Z</updated>
  </entry>
</feed>
"""


def test_pattern_extractor_turns_plain_news_into_edits_with_provenance(
    store: Store, feed_server: FeedServer
) -> None:
    first = ATOM_NEWS.format(title="Jane Roe was appointed chief executive of Acme Corp")
    second = ATOM_NEWS.format(title="Acme Corp Names Joan Poe As CEO")
    feed_server.route(
        "/atom",
        Reply(body=first.encode(), content_type="application/atom+xml"),
        Reply(body=second.encode(), content_type="application/atom+xml"),
    )
    feed_store.upsert_feed(store, "wire", feed_server.url("/atom"))
    poller = make_poller(store, pattern_extractor=True)
    report = poller.poll("wire")
    assert report.items == 2 and len(report.edits) == 1
    record = EditQueue(store).get(report.edits[0])
    assert record.request is not None
    assert (record.request.prompt, record.request.target) == (
        "The chief executive of Acme Corp is",
        " Jane Roe",
    )
    origin = feed_store.provenance_of(store, record.id)
    assert origin is not None and origin.extractor.startswith("pattern:ceo_of")
    assert origin.evidence == "Jane Roe was appointed chief executive of Acme Corp"
    (event,) = editlog.events(store, kind="feed_item_edit")
    assert event.edit_id == record.id and event.data["item_id"] == "urn:wire:1"
    # The same item now names another CEO: the new edit supersedes the old one.
    update = poller.poll("wire")
    new = EditQueue(store).get(update.edits[0])
    assert new.request is not None
    assert (new.request.target, new.request.supersedes) == (" Joan Poe", record.id)


def test_plain_items_make_no_edits_with_the_extractor_off(
    store: Store, feed_server: FeedServer
) -> None:
    body = ATOM_NEWS.format(title="Jane Roe was appointed chief executive of Acme Corp")
    feed_server.route("/atom", Reply(body=body.encode()))
    feed_store.upsert_feed(store, "wire", feed_server.url("/atom"))
    report = make_poller(store).poll("wire")
    assert (report.outcome, report.new, report.edits) == ("ok", 2, [])
    assert build_extractors(FeedsConfig()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Jane Roe has been named CEO of Initech", ("Initech", " Jane Roe")),
        (
            "Bo Li is appointed as the new chief executive officer of Bank of Avalon",
            ("Bank of Avalon", " Bo Li"),
        ),
        ("Globex appoints Hank Scorpio as its new CEO", ("Globex", " Hank Scorpio")),
        ("Vale becomes the new capital of Norland", ("Norland", " Vale")),
        ("Markets close higher", None),
        ("the board appointed nobody", None),
    ],
)
def test_builtin_rules(text: str, expected: tuple[str, str] | None) -> None:
    from daemon.feeds.extract import BUILTIN_RULES
    from daemon.feeds.parse import FeedEntry

    entry = FeedEntry(
        item_id="x", title=text, summary="", link=None, fact_edit=None, content_hash="h"
    )
    found = PatternExtractor(BUILTIN_RULES).extract(entry)
    if expected is None:
        assert found == []
    else:
        (one,) = found
        assert (one.request["subject"], one.request["target"]) == expected
        assert one.request["prompt"].endswith(f"of {expected[0]} is")
