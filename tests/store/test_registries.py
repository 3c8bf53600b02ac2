"""The small registries: event log, batches, checkpoints, probe runs, feeds."""

from __future__ import annotations

import json

import pytest

from daemon.errors import RecordNotFoundError, StoreError
from store import editlog
from store.batches import BatchStatus, create_batch, finish_batch, get_batch
from store.checkpoints import (
    CheckpointStatus,
    get_checkpoint,
    latest_good,
    list_checkpoints,
    mark_bad,
    record_checkpoint,
)
from store.db import Store
from store.feeds import (
    FeedStatus,
    get_feed,
    get_feed_item,
    list_feeds,
    record_feed_item,
    record_feed_poll,
    remove_feed,
    upsert_feed,
)
from store.probes import latest_probe_run, record_probe_run
from tests.store.helpers import FakeClock

SHA = "ab" * 32


def test_editlog_append_and_filter(store: Store, clock: FakeClock) -> None:
    """Events get increasing ids and the clock's time; filters combine."""
    first = editlog.append(store, "edit_enqueued", edit_id="a")
    clock.advance(1)
    second = editlog.append(store, "edit_applied", edit_id="a", batch_id="b", data={"x": "\ud800"})
    editlog.append(store, "edit_enqueued", edit_id="c")
    assert second > first and editlog.last_event_id(store) == second + 1
    assert [e.id for e in editlog.events(store, edit_id="a")] == [first, second]
    assert [e.edit_id for e in editlog.events(store, kind="edit_enqueued")] == ["a", "c"]
    event = editlog.events(store, batch_id="b")[0]
    assert event.ts == clock.now and event.data == {"x": "\ud800"}
    assert [e.id for e in editlog.events(store, after_id=first, limit=1)] == [second]
    json.dumps(event.to_json_dict())


@pytest.mark.parametrize("kind", ["Applied", "applied", "edit-applied", "edit applied", ""])
def test_editlog_kind_must_be_snake_case(store: Store, kind: str) -> None:
    """Event kinds are snake_case words joined by underscores."""
    with pytest.raises(ValueError):
        editlog.append(store, kind)


def test_batches(store: Store, clock: FakeClock) -> None:
    """A batch runs, then finishes once; unknown ids raise RecordNotFoundError."""
    batch_id = create_batch(store, "melo", ["e1", "e2"])
    batch = get_batch(store, batch_id)
    assert (batch.status, batch.edit_ids, batch.finished_at) == (
        BatchStatus.RUNNING,
        ("e1", "e2"),
        None,
    )
    clock.advance(2)
    done = finish_batch(store, batch_id, BatchStatus.PARTIAL, error="e2 failed verification")
    assert (done.status, done.finished_at, done.error) == (
        "partial",
        clock.now,
        "e2 failed verification",
    )
    with pytest.raises(StoreError, match="already finished"):
        finish_batch(store, batch_id, "failed")
    with pytest.raises(ValueError):
        finish_batch(store, create_batch(store, "hook", []), BatchStatus.RUNNING)
    with pytest.raises(RecordNotFoundError):
        get_batch(store, "nope")
    kinds = [e.kind for e in editlog.events(store, batch_id=batch_id)]
    assert kinds == ["batch_created", "batch_finished"]
    assert done.to_json_dict()["edit_ids"] == ["e1", "e2"]


def test_checkpoints(store: Store, clock: FakeClock) -> None:
    """Checkpoints list newest first; latest_good skips bad ones."""
    assert latest_good(store) is None
    old = record_checkpoint(store, path="/c/1", watermark=10, edit_count=5, manifest_sha256=SHA)
    clock.advance(60)
    new = record_checkpoint(
        store, path="/c/2", watermark=20, edit_count=9, manifest_sha256=SHA, checkpoint_id="cp2"
    )
    assert new.id == "cp2" and new.status is CheckpointStatus.GOOD
    assert [c.id for c in list_checkpoints(store)] == ["cp2", old.id]
    assert latest_good(store) == new
    bad = mark_bad(store, "cp2", note="drift")
    assert bad.status is CheckpointStatus.BAD and bad.note == "drift"
    assert latest_good(store) == old
    assert [c.id for c in list_checkpoints(store, status="bad")] == ["cp2"]
    assert get_checkpoint(store, old.id).to_json_dict()["watermark"] == 10
    with pytest.raises(RecordNotFoundError):
        mark_bad(store, "nope")
    with pytest.raises(ValueError):
        record_checkpoint(store, path="/c", watermark=0, edit_count=0, manifest_sha256="xyz")


def test_probe_runs(store: Store) -> None:
    """Probe runs keep metrics and verdict; latest per kind."""
    assert latest_probe_run(store) is None
    cp = record_checkpoint(store, path="/c", watermark=1, edit_count=1, manifest_sha256=SHA)
    record_probe_run(store, "drift", {"kl": 0.01, "top1": 0.99}, True, checkpoint_id=cp.id)
    run = record_probe_run(store, "retention", {"acc": 0.5}, False)
    assert latest_probe_run(store) == run and run.passed is False
    drift = latest_probe_run(store, "drift")
    assert drift is not None and drift.metrics == {"kl": 0.01, "top1": 0.99}
    assert drift.checkpoint_id == cp.id and drift.passed is True
    assert latest_probe_run(store, "other") is None


def test_feeds(store: Store, clock: FakeClock) -> None:
    """Feeds upsert by name, keep validators per URL, and record polls and items."""
    feed = upsert_feed(store, "news", "https://a.test/rss", interval_s=600)
    assert (feed.status, feed.etag, feed.interval_s) == (FeedStatus.ACTIVE, None, 600)
    record_feed_poll(store, "news", etag='"v1"', last_modified="Mon")
    assert get_feed(store, "news").etag == '"v1"'
    assert upsert_feed(store, "news", "https://a.test/rss", interval_s=60).etag == '"v1"'
    moved = upsert_feed(store, "news", "https://b.test/rss")
    assert moved.etag is None and moved.last_modified is None
    clock.advance(5)
    failing = record_feed_poll(store, "news", error="HTTP 500")
    assert (failing.status, failing.last_error, failing.last_polled_at) == (
        FeedStatus.ERROR,
        "HTTP 500",
        clock.now,
    )
    assert record_feed_poll(store, "news", etag="x").status is FeedStatus.ACTIVE
    upsert_feed(store, "alpha", "https://c.test/feed.json", status="paused")
    assert [f.name for f in list_feeds(store)] == ["alpha", "news"]
    assert record_feed_item(store, "news", "item-1", content_hash="h") is True
    assert record_feed_item(store, "news", "item-1", content_hash="h") is False
    item = get_feed_item(store, "news", "item-1")
    assert item is not None and item.content_hash == "h" and item.seen_at == clock.now
    assert get_feed_item(store, "news", "item-2") is None
    assert remove_feed(store, "news") is True and remove_feed(store, "news") is False
    assert get_feed_item(store, "news", "item-1") is None, "items go with their feed"
    with pytest.raises(RecordNotFoundError):
        get_feed(store, "news")
    with pytest.raises(RecordNotFoundError):
        record_feed_item(store, "news", "x")
    with pytest.raises(ValueError):
        upsert_feed(store, "bad name", "https://x")
    json.dumps(get_feed(store, "alpha").to_json_dict())
