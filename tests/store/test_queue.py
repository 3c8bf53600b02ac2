"""The durable queue: intake, idempotency, leases, retries, transitions, paging."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import (
    ConfigError,
    EditNotFoundError,
    InvalidTransitionError,
    LeaseLostError,
)
from store import editlog
from store.db import Store
from store.queue import EditQueue, QueuePolicy
from store.records import (
    EditRequest,
    EditSource,
    EditStatus,
    Schedule,
    SourceKind,
    parse_edit_request,
)
from tests.store.helpers import FakeClock, json_values, request


def kinds(store: Store, edit_id: str) -> list[str]:
    """The event kinds logged for one edit, in order."""
    return [e.kind for e in editlog.events(store, edit_id=edit_id)]


# --- intake --------------------------------------------------------------------------


def test_submit_queues_a_valid_request(queue: EditQueue, store: Store) -> None:
    """A valid request is queued with its canonical JSON, hash and an event."""
    result = queue.submit(request(1, subject="Acme1"), source_kind=SourceKind.CLI)
    assert result.created and result.status is EditStatus.QUEUED and result.reason is None
    record = queue.get(result.id)
    cli = EditSource(SourceKind.CLI)
    assert record.request == parse_edit_request(request(1, subject="Acme1"), default_source=cli)
    assert record.content_hash == record.request.content_hash()
    assert (record.attempts, record.schedule, record.source_kind) == (0, Schedule.NOW, "cli")
    assert kinds(store, result.id) == ["edit_enqueued"]


def test_client_id_is_idempotent(queue: EditQueue) -> None:
    """The same id with the same content returns the existing record, created=False."""
    first = queue.submit(request(1, id="client-7"))
    again = queue.submit(json.dumps(request(1, id="client-7", source={"kind": "feed"})))
    assert first.id == again.id == "client-7"
    assert first.created and not again.created
    assert queue.counts()["queued"] == 1


def test_client_id_conflict_is_stored_as_rejected(queue: EditQueue) -> None:
    """The same id with different content is rejected and does not take the id."""
    queue.submit(request(1, id="client-7"))
    clash = queue.submit(request(2, id="client-7"))
    assert clash.status is EditStatus.REJECTED and clash.id != "client-7"
    assert clash.reason == "id 'client-7' was already used for a different request"
    record = queue.get(clash.id)
    assert record.client_id == "client-7" and record.error == clash.reason
    assert json.loads(record.raw_request)["target"] == " Jane Roe 2"
    assert queue.get("client-7").request == parse_edit_request(request(1, id="client-7"))


def test_content_hash_dedupes_live_edits_without_id(queue: EditQueue) -> None:
    """Without an id, the same content as a live edit returns that edit."""
    first = queue.submit(request(1))
    again = queue.submit(request(1, source={"kind": "spool"}))
    assert again.id == first.id and not again.created
    (claimed,) = queue.claim(1, 10, "w")
    queue.ack(claimed.id, "w", backend="melo")
    assert queue.submit(request(1)).id == first.id, "applied counts as live"
    queue.transition(first.id, EditStatus.RETRACTED)
    fresh = queue.submit(request(1))
    assert fresh.created and fresh.id != first.id, "a retracted fact may be submitted again"


def test_rejected_input_is_stored_with_its_reason(queue: EditQueue, store: Store) -> None:
    """Invalid input never raises and is never dropped; the client id stays free."""
    bad = queue.submit({"id": "c1", "prompt": "The CEO is", "target": "  "})
    assert bad.status is EditStatus.REJECTED and bad.created
    assert bad.reason is not None and "field 'target'" in bad.reason
    record = queue.get(bad.id)
    assert record.status is EditStatus.REJECTED and record.request is None
    assert record.client_id == "c1" and record.error == bad.reason
    assert json.loads(record.raw_request) == {"id": "c1", "prompt": "The CEO is", "target": "  "}
    assert [r.id for r in queue.list(status=EditStatus.REJECTED)] == [bad.id]
    assert kinds(store, bad.id) == ["edit_rejected"]
    assert queue.submit(request(1, id="c1")).id == "c1", "rejected records hold no id"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not utf-8",
        "{not json",
        '{"prompt": "a\\ud800", "target": "b"}',
        {"prompt": "a\ud800", "target": "b", "id": "x\udc00"},
        {"\ud800": 1},
        [1, 2, 3],
        None,
        "x" * 300_000,
        {"prompt": object(), "target": {1, 2}},
    ],
)
def test_any_garbage_is_stored_as_rejected(queue: EditQueue, raw: object) -> None:
    """Whatever the input, submit stores a rejected record (text kept, at most 64 KiB)."""
    result = queue.submit(raw)
    assert result.status is EditStatus.REJECTED
    record = queue.get(result.id)
    assert record.error and len(record.raw_request.encode()) <= 64 * 1024
    assert record.to_json_dict()["raw_request"] == record.raw_request


@given(json_values | st.binary(max_size=200) | st.text(max_size=200))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_submit_never_raises_for_bad_input(queue: EditQueue, raw: object) -> None:
    """Any JSON-like value, text or bytes is stored: queued, deduplicated or rejected."""
    result = queue.submit(raw)
    record = queue.get(result.id)
    assert record.status is result.status
    if result.status is EditStatus.REJECTED:
        assert record.error == result.reason and record.request is None


def test_submit_many_is_one_transaction(queue: EditQueue) -> None:
    """A batch mixes results; duplicates inside the batch dedupe against each other."""
    results = queue.submit_many([request(1), {"prompt": 1}, request(1), request(2)])
    assert [r.status for r in results] == ["queued", "rejected", "queued", "queued"]
    assert results[2].id == results[0].id and not results[2].created
    assert queue.counts()["queued"] == 2


def test_enqueue_revalidates(queue: EditQueue) -> None:
    """enqueue() takes a built request, and rejects one that is invalid."""
    ok = queue.enqueue(EditRequest(prompt="The sky is", target=" green"))
    assert ok.status is EditStatus.QUEUED
    bad = queue.enqueue(EditRequest(prompt="The sky is", target=" blue", subject="sea"))
    assert bad.status is EditStatus.REJECTED and bad.reason and "subject" in bad.reason


# --- claim, ack, fail, release ---------------------------------------------------------


def test_claim_takes_due_edits_in_order(queue: EditQueue, clock: FakeClock) -> None:
    """Claims follow queue order, set the lease and count the attempt."""
    ids = [queue.submit(request(i)).id for i in range(5)]
    first = queue.claim(2, 30, "w1")
    assert [r.id for r in first] == ids[:2]
    assert all(r.status is EditStatus.APPLYING for r in first)
    assert all(r.lease_owner == "w1" and r.lease_expires == clock.now + 30 for r in first)
    assert all(r.attempts == 1 for r in first)
    assert [r.id for r in queue.claim(10, 30, "w2")] == ids[2:]
    assert queue.claim(10, 30, "w3") == []
    assert queue.depth() == 5


def test_ack_applies_and_logs(queue: EditQueue, store: Store, clock: FakeClock) -> None:
    """ack() records the back-end, batch and result, and clears the lease."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 30, "w1")
    clock.advance(3)
    record = queue.ack(edit_id, "w1", backend="hook", batch_id="b1", result={"ok": True})
    assert record.status is EditStatus.APPLIED and record.backend == "hook"
    assert (record.batch_id, record.result, record.applied_at) == ("b1", {"ok": True}, clock.now)
    assert record.lease_owner is None and record.lease_expires is None
    assert kinds(store, edit_id) == ["edit_enqueued", "edit_claimed", "edit_applied"]
    assert queue.depth() == 0


def test_ack_by_another_worker_loses_the_lease(queue: EditQueue) -> None:
    """Only the lease holder may ack or fail."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 30, "w1")
    with pytest.raises(LeaseLostError):
        queue.ack(edit_id, "w2", backend="melo")
    with pytest.raises(LeaseLostError):
        queue.fail(edit_id, "w2", "nope")
    with pytest.raises(EditNotFoundError):
        queue.ack("no-such-edit", "w1", backend="melo")


def test_ack_replacing_retires_what_the_edit_replaces_in_the_same_transaction(
    queue: EditQueue, store: Store
) -> None:
    """An applied target becomes superseded, an unapplied one retracted, others stay;
    when the ack itself fails (lease lost) nothing is retired."""
    applied, waiting, failed, new, late = (queue.submit(request(n)).id for n in range(5))
    queue.claim(1, 30, "w1")
    queue.ack(applied, "w1", backend="melo")
    queue.transition(waiting, EditStatus.RETRACTED)  # already gone: left alone
    queue.claim(2, 30, "w1")
    queue.fail(failed, "w1", "no", retry=False)
    with pytest.raises(LeaseLostError):
        queue.ack_replacing(new, "w2", backend="hook", replaces=[applied, failed])
    assert queue.get(applied).status is EditStatus.APPLIED
    assert queue.get(failed).status is EditStatus.FAILED
    record, retired = queue.ack_replacing(
        new, "w1", backend="hook", replaces=[applied, failed, waiting, "no-such-edit", new]
    )
    assert record.status is EditStatus.APPLIED and retired == [applied, failed]
    assert queue.get(applied).status is EditStatus.SUPERSEDED
    assert queue.get(failed).status is EditStatus.RETRACTED
    assert queue.get(applied).error == f"superseded by {new}"
    (event,) = [e for e in editlog.events(store, edit_id=applied) if e.kind == "edit_superseded"]
    assert event.data["by"] == new and event.data["from"] == "applied"
    assert queue.get(late).status is EditStatus.QUEUED


def test_expired_and_reclaimed_lease_is_lost(queue: EditQueue, clock: FakeClock) -> None:
    """After expiry and a new claim, the old holder's ack raises LeaseLostError."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 5, "w1")
    clock.advance(6)
    assert queue.requeue_expired() == 1
    clock.advance(QueuePolicy().backoff_s(1))
    (again,) = queue.claim(1, 5, "w2")
    assert again.id == edit_id and again.attempts == 2
    with pytest.raises(LeaseLostError):
        queue.ack(edit_id, "w1", backend="melo")
    assert queue.ack(edit_id, "w2", backend="melo").status is EditStatus.APPLIED


def test_expired_lease_not_yet_taken_back_can_still_ack(queue: EditQueue, clock: FakeClock) -> None:
    """A slow worker whose lease ran out may still ack while nobody has taken the edit."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 5, "slow")
    clock.advance(60)
    assert queue.ack(edit_id, "slow", backend="hook").status is EditStatus.APPLIED
    assert queue.requeue_expired() == 0


def test_source_kind_may_be_a_string(queue: EditQueue) -> None:
    """submit() accepts the source kind's value as a plain string."""
    edit_id = queue.submit(request(), source_kind="feed").id
    assert queue.get(edit_id).source_kind == "feed"


def test_heartbeat_extends_only_held_leases(queue: EditQueue, clock: FakeClock) -> None:
    """heartbeat() extends the caller's leases and reports which it still holds."""
    a, b = (queue.submit(request(i)).id for i in range(2))
    queue.claim(1, 5, "w1")
    queue.claim(1, 5, "w2")
    clock.advance(4)
    assert queue.heartbeat("w1", [a, b, "missing"], 10) == [a]
    clock.advance(4)
    assert queue.requeue_expired() == 1  # b expired, a was extended
    assert queue.get(a).lease_expires == clock.now - 4 + 10
    assert queue.get(b).status is EditStatus.QUEUED


def test_fail_backs_off_then_dies(queue: EditQueue, store: Store, clock: FakeClock) -> None:
    """Failures retry after 2 s, 4 s; the third failure is final."""
    edit_id = queue.submit(request()).id
    for attempt, delay in ((1, 2.0), (2, 4.0)):
        (record,) = queue.claim(1, 30, "w")
        assert record.attempts == attempt
        failed = queue.fail(edit_id, "w", f"oom {attempt}")
        assert failed.status is EditStatus.QUEUED and failed.not_before == clock.now + delay
        assert failed.error == f"oom {attempt}"
        clock.advance(delay - 0.5)
        assert queue.claim(1, 30, "w") == [], "not before the back-off ends"
        clock.advance(0.5)
    queue.claim(1, 30, "w")
    dead = queue.fail(edit_id, "w", "oom 3")
    assert dead.status is EditStatus.FAILED and dead.attempts == 3
    assert kinds(store, edit_id).count("edit_requeued") == 2
    assert kinds(store, edit_id)[-1] == "edit_failed"


def test_fail_without_retry_is_final(queue: EditQueue) -> None:
    """retry=False fails at once."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 30, "w")
    assert queue.fail(edit_id, "w", "bad edit", retry=False).status is EditStatus.FAILED


def test_release_returns_without_penalty(queue: EditQueue, store: Store) -> None:
    """release() requeues at once and does not count the attempt."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 30, "w")
    released = queue.release(edit_id, "w")
    assert released.status is EditStatus.QUEUED and released.attempts == 0
    assert released.lease_owner is None
    assert queue.claim(1, 30, "w")[0].attempts == 1
    assert "edit_released" in kinds(store, edit_id)


def test_requeue_expired(queue: EditQueue, store: Store, clock: FakeClock) -> None:
    """Expired leases go back to the queue; at max attempts they fail with the reason."""
    queue = EditQueue(store, QueuePolicy(max_attempts=2, backoff_base_s=1))
    a, b = (queue.submit(request(i)).id for i in range(2))
    queue.claim(2, 10, "w")
    clock.advance(9.9)
    assert queue.requeue_expired() == 0
    clock.advance(0.1)
    assert queue.requeue_expired() == 2
    assert {queue.get(a).status, queue.get(b).status} == {EditStatus.QUEUED}
    clock.advance(1)
    queue.claim(2, 10, "w")
    clock.advance(10)
    assert queue.requeue_expired() == 2
    dead = queue.get(a)
    assert dead.status is EditStatus.FAILED and dead.error == "lease expired after 2 attempts"
    assert kinds(store, a).count("lease_expired") == 2


def test_claim_sweeps_expired_leases_first(queue: EditQueue, clock: FakeClock) -> None:
    """A claim after expiry takes the abandoned edit back; it is due after its back-off."""
    edit_id = queue.submit(request()).id
    queue.claim(1, 5, "dead-worker")
    clock.advance(5)
    assert queue.claim(1, 5, "w") == []
    assert queue.get(edit_id).status is EditStatus.QUEUED
    clock.advance(QueuePolicy().backoff_s(1))
    assert queue.claim(1, 5, "w")[0].id == edit_id
    assert queue.get(edit_id).lease_owner == "w"


def test_nightly_edits_wait_for_release_schedule(queue: EditQueue, store: Store) -> None:
    """Nightly edits are not claimed until their schedule is released."""
    nightly = queue.submit(request(1, schedule="nightly")).id
    now = queue.submit(request(2)).id
    assert [r.id for r in queue.claim(10, 30, "w")] == [now]
    assert queue.claim(10, 30, "w") == []
    assert queue.release_schedule(Schedule.NIGHTLY) == 1
    assert queue.release_schedule(Schedule.NIGHTLY) == 0
    assert [r.id for r in queue.claim(10, 30, "w")] == [nightly]
    assert "edit_schedule_released" in kinds(store, nightly)


def test_claim_may_include_nightly(queue: EditQueue) -> None:
    """The nightly job may claim nightly edits directly."""
    nightly = queue.submit(request(1, schedule="nightly")).id
    claimed = queue.claim(10, 30, "w", schedules=(Schedule.NOW, Schedule.NIGHTLY))
    assert [r.id for r in claimed] == [nightly]


# --- transitions, reads --------------------------------------------------------------


def test_transition_guard(queue: EditQueue, store: Store) -> None:
    """Only ALLOWED_TRANSITIONS are possible; each logs an event."""
    edit_id = queue.submit(request()).id
    with pytest.raises(InvalidTransitionError, match="from 'queued' to 'applied'"):
        queue.transition(edit_id, EditStatus.APPLIED)
    queue.claim(1, 30, "w")
    queue.ack(edit_id, "w", backend="melo")
    q = queue.transition(edit_id, EditStatus.QUARANTINED, reason="drift", data={"kl": 0.3})
    assert q.status is EditStatus.QUARANTINED and q.error == "drift"
    queue.transition(edit_id, EditStatus.QUEUED)
    queue.transition(edit_id, EditStatus.RETRACTED)
    with pytest.raises(InvalidTransitionError):
        queue.transition(edit_id, EditStatus.QUEUED)
    with pytest.raises(EditNotFoundError):
        queue.transition("nope", EditStatus.RETRACTED)
    assert kinds(store, edit_id)[-3:] == ["edit_quarantined", "edit_requeued", "edit_retracted"]
    assert editlog.events(store, edit_id=edit_id, kind="edit_quarantined")[0].data["kl"] == 0.3


def test_rejected_is_terminal(queue: EditQueue) -> None:
    """Nothing leaves the rejected state."""
    bad = queue.submit({"prompt": "x"}).id
    for status in EditStatus:
        with pytest.raises(InvalidTransitionError):
            queue.transition(bad, status)


def test_list_pages_by_seq(queue: EditQueue) -> None:
    """Pages follow queue order; ``after`` is the previous page's last id."""
    ids = [queue.submit(request(i)).id for i in range(7)]
    page1 = queue.list(limit=3)
    page2 = queue.list(limit=3, after=page1[-1].id)
    page3 = queue.list(limit=3, after=page2[-1].id)
    assert [r.id for r in page1 + page2 + page3] == ids
    assert queue.list(after=ids[-1]) == []
    queue.claim(2, 30, "w")
    assert [r.id for r in queue.list(status=EditStatus.QUEUED, limit=2)] == ids[2:4]
    with pytest.raises(EditNotFoundError):
        queue.list(after="nope")
    with pytest.raises(ValueError):
        queue.list(limit=0)


def test_counts_and_depth(queue: EditQueue) -> None:
    """counts() names every state; depth() is queued + applying."""
    for i in range(4):
        queue.submit(request(i))
    queue.submit({"bad": True})
    queue.claim(1, 30, "w")
    counts = queue.counts()
    assert set(counts) == {s.value for s in EditStatus}
    assert (counts["queued"], counts["applying"], counts["rejected"]) == (3, 1, 1)
    assert queue.depth() == 4


def test_record_to_json_dict(queue: EditQueue) -> None:
    """The API view holds the request, status and timings, and is JSON."""
    edit_id = queue.submit(request(1, id="abc")).id
    out = queue.get(edit_id).to_json_dict()
    assert out["request"]["id"] == "abc" and out["status"] == "queued"
    assert "raw_request" not in out
    json.dumps(out)


def test_get_missing(queue: EditQueue) -> None:
    """get() of an unknown id raises EditNotFoundError."""
    with pytest.raises(EditNotFoundError):
        queue.get("missing")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"backoff_base_s": -1}, "backoff_base_s"),
        ({"backoff_max_s": 1.0}, "backoff_max_s"),
        ({"backoff_base_s": float("nan")}, "backoff_base_s"),
    ],
)
def test_queue_policy_is_validated(kwargs: dict[str, object], key: str) -> None:
    """Bad policies name their field."""
    with pytest.raises(ConfigError) as info:
        QueuePolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_backoff_is_capped() -> None:
    """Back-off doubles per attempt up to backoff_max_s."""
    policy = QueuePolicy(backoff_base_s=2, backoff_max_s=300)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 9, 10_000)] == [2, 4, 8, 300, 300]
