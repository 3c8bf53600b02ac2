"""fetch_feed against a real local HTTP server: validators, redirects, retries, limits."""

from __future__ import annotations

import gzip
import socket
from typing import Literal

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.errors import FeedFetchError
from daemon.feeds.fetch import FetchOutcome, FetchPolicy, fetch_feed
from tests.daemon.feeds.conftest import FeedServer, Reply, SeenRequest

FEED = b'{"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": []}'
ETAG = '"v1"'
HTTP_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"
FAST = FetchPolicy(timeout_s=2.0, backoff_s=1.0)


class Sleeps(list[float]):
    """A ``sleep`` that records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def test_ok_returns_body_type_and_validators(feed_server: FeedServer, sleeps: Sleeps) -> None:
    """A 200 gives the body, its content type and the server's ETag and Last-Modified."""
    feed_server.route(
        "/feed",
        Reply(body=FEED, content_type="application/feed+json", etag=ETAG, last_modified=HTTP_DATE),
    )
    url = feed_server.url("/feed")
    result = fetch_feed(url, policy=FAST, sleep=sleeps)
    assert result.outcome is FetchOutcome.OK
    assert (result.url, result.moved, result.status_code) == (url, False, 200)
    assert result.body == FEED
    assert result.content_type == "application/feed+json"
    assert (result.etag, result.last_modified) == (ETAG, HTTP_DATE)
    assert sleeps == []


def test_request_headers_name_agent_and_feed_types(feed_server: FeedServer) -> None:
    """The request carries the policy's User-Agent and accepts JSON Feed, Atom and RSS."""
    feed_server.route("/feed", Reply(body=FEED))
    fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(user_agent="editd-test/9"))
    (seen,) = feed_server.requests
    assert seen.headers["user-agent"] == "editd-test/9"
    for media_type in ("application/feed+json", "application/atom+xml", "application/rss+xml"):
        assert media_type in seen.headers["accept"]
    assert "if-none-match" not in seen.headers
    assert "if-modified-since" not in seen.headers


def test_conditional_get_sends_validators_and_gets_not_modified(feed_server: FeedServer) -> None:
    """Stored validators go out as If-None-Match / If-Modified-Since; a 304 is NOT_MODIFIED."""
    feed_server.route("/feed", Reply(body=FEED, etag=ETAG))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG, last_modified=HTTP_DATE)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.status_code, result.body) == (304, b"")
    assert (result.etag, result.last_modified) == (ETAG, HTTP_DATE)
    (seen,) = feed_server.requests
    assert seen.headers["if-none-match"] == ETAG
    assert seen.headers["if-modified-since"] == HTTP_DATE


def test_not_modified_by_last_modified_alone(feed_server: FeedServer) -> None:
    """If-Modified-Since alone can earn a 304; the validator we sent is kept."""
    feed_server.route("/feed", Reply(body=FEED, last_modified=HTTP_DATE))
    result = fetch_feed(feed_server.url("/feed"), last_modified=HTTP_DATE)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.etag, result.last_modified) == (None, HTTP_DATE)


def test_not_modified_takes_new_validators_from_the_server(feed_server: FeedServer) -> None:
    """On a 304 that carries a new ETag, the new one is returned."""
    feed_server.route("/feed", Reply(304, etag='"v2"'))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG, last_modified=HTTP_DATE)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.etag, result.last_modified) == ('"v2"', HTTP_DATE)


def test_changed_feed_returns_ok_with_new_etag(feed_server: FeedServer) -> None:
    """A stale ETag gets the full body and the new ETag."""
    feed_server.route("/feed", Reply(body=FEED, etag='"v2"'))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG)
    assert result.outcome is FetchOutcome.OK
    assert result.etag == '"v2"'


@pytest.mark.parametrize("status", [301, 308])
def test_permanent_redirect_updates_the_url(feed_server: FeedServer, status: int) -> None:
    """301 and 308 are followed and their target is the URL to store."""
    feed_server.redirect("/old", "/feed", status=status)
    feed_server.route("/feed", Reply(body=FEED))
    result = fetch_feed(feed_server.url("/old"))
    assert result.outcome is FetchOutcome.OK
    assert (result.url, result.moved) == (feed_server.url("/feed"), True)
    assert result.body == FEED


@pytest.mark.parametrize("status", [302, 303, 307])
def test_temporary_redirect_keeps_the_url(feed_server: FeedServer, status: int) -> None:
    """302, 303 and 307 are followed but the requested URL stays the one to store."""
    feed_server.redirect("/old", "/feed", status=status)
    feed_server.route("/feed", Reply(body=FEED))
    url = feed_server.url("/old")
    result = fetch_feed(url)
    assert result.body == FEED
    assert (result.url, result.moved) == (url, False)


def test_permanent_then_temporary_stores_the_permanent_target(feed_server: FeedServer) -> None:
    """In a 301 -> 302 chain only the 301's target is stored."""
    feed_server.redirect("/a", "/b", status=301)
    feed_server.redirect("/b", "/c", status=302)
    feed_server.route("/c", Reply(body=FEED))
    result = fetch_feed(feed_server.url("/a"))
    assert result.body == FEED
    assert (result.url, result.moved) == (feed_server.url("/b"), True)


def test_temporary_then_permanent_keeps_the_requested_url(feed_server: FeedServer) -> None:
    """Once a hop was temporary, later permanent hops do not move the stored URL."""
    feed_server.redirect("/a", "/b", status=302)
    feed_server.redirect("/b", "/c", status=301)
    feed_server.route("/c", Reply(body=FEED))
    url = feed_server.url("/a")
    result = fetch_feed(url)
    assert (result.url, result.moved, result.body) == (url, False, FEED)


def test_redirect_keeps_the_validators(feed_server: FeedServer) -> None:
    """The conditional headers go to the redirect target too."""
    feed_server.redirect("/old", "/feed", status=301)
    feed_server.route("/feed", Reply(body=FEED, etag=ETAG))
    result = fetch_feed(feed_server.url("/old"), etag=ETAG)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert result.url == feed_server.url("/feed")
    assert feed_server.requests_to("/feed")[0].headers["if-none-match"] == ETAG


def test_redirect_loop_is_an_error(feed_server: FeedServer) -> None:
    """A -> B -> A is refused as a loop, without waiting for the redirect limit."""
    feed_server.redirect("/a", "/b", status=302)
    feed_server.redirect("/b", "/a", status=302)
    with pytest.raises(FeedFetchError, match="redirect loop") as info:
        fetch_feed(feed_server.url("/a"))
    assert info.value.transient is False
    assert len(feed_server.requests) == 2


def test_too_many_redirects_is_an_error(feed_server: FeedServer) -> None:
    """A chain longer than max_redirects is refused."""
    for hop in range(5):
        feed_server.redirect(f"/r{hop}", f"/r{hop + 1}", status=301)
    feed_server.route("/r5", Reply(body=FEED))
    policy = FetchPolicy(max_redirects=3)
    with pytest.raises(FeedFetchError, match=r"too many redirects \(more than 3\)"):
        fetch_feed(feed_server.url("/r0"), policy=policy)
    assert len(feed_server.requests) == 4
    assert fetch_feed(feed_server.url("/r0")).url == feed_server.url("/r5")


def test_redirect_to_another_scheme_is_an_error(feed_server: FeedServer) -> None:
    """A Location outside http(s) is refused."""
    feed_server.redirect("/a", "file:///etc/passwd", status=301)
    with pytest.raises(FeedFetchError, match="not http or https"):
        fetch_feed(feed_server.url("/a"))


def test_gone_is_an_outcome_without_retry(feed_server: FeedServer, sleeps: Sleeps) -> None:
    """410 means GONE at once: no retry, no body."""
    feed_server.route("/feed", Reply(410, body=b"gone"))
    result = fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert result.outcome is FetchOutcome.GONE
    assert (result.status_code, result.body) == (410, b"")
    assert feed_server.count("/feed") == 1
    assert sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_fail_without_retry(
    feed_server: FeedServer, sleeps: Sleeps, status: int
) -> None:
    """Other 4xx fail at once and are not transient."""
    feed_server.route("/feed", Reply(status))
    with pytest.raises(FeedFetchError, match=f"HTTP {status}") as info:
        fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert (info.value.status_code, info.value.transient) == (status, False)
    assert feed_server.count("/feed") == 1
    assert sleeps == []


def test_server_errors_are_retried_with_doubling_back_off(
    feed_server: FeedServer, sleeps: Sleeps
) -> None:
    """503 twice then 200: OK after two retries that waited 1 s then 2 s."""
    feed_server.route("/feed", Reply(503), Reply(503), Reply(body=FEED))
    result = fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert (result.outcome, result.body) == (FetchOutcome.OK, FEED)
    assert feed_server.count("/feed") == 3
    assert sleeps == [1.0, 2.0]


@pytest.mark.parametrize("status", [408, 429, 500, 502])
def test_retryable_statuses(feed_server: FeedServer, sleeps: Sleeps, status: int) -> None:
    """408, 429 and every 5xx are retried."""
    feed_server.route("/feed", Reply(status), Reply(body=FEED))
    result = fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert result.outcome is FetchOutcome.OK
    assert sleeps == [1.0]


@pytest.mark.parametrize(("header", "wait"), [("7", 7.0), ("600", 60.0), ("soon", 0.5)])
def test_retry_after_seconds_replaces_the_back_off(
    feed_server: FeedServer, sleeps: Sleeps, header: str, wait: float
) -> None:
    """Retry-After in seconds is honoured (capped at 60 s); other forms use the back-off."""
    feed_server.route("/feed", Reply(429, headers={"Retry-After": header}), Reply(body=FEED))
    policy = FetchPolicy(backoff_s=0.5)
    assert fetch_feed(feed_server.url("/feed"), policy=policy, sleep=sleeps).body == FEED
    assert sleeps == [wait]


def test_persistent_server_error_reports_the_attempts(
    feed_server: FeedServer, sleeps: Sleeps
) -> None:
    """503 forever: after 1 + retries attempts a transient error naming them."""
    feed_server.route("/feed", Reply(503))
    with pytest.raises(FeedFetchError, match="HTTP 503 after 3 attempts") as info:
        fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert (info.value.status_code, info.value.attempts, info.value.transient) == (503, 3, True)
    assert feed_server.count("/feed") == 3
    assert sleeps == [1.0, 2.0]


def test_timeout_is_retried_then_an_error(feed_server: FeedServer, sleeps: Sleeps) -> None:
    """A server slower than timeout_s: each attempt times out, then a transient error."""
    feed_server.route("/feed", Reply(body=FEED, delay_s=2.0))
    policy = FetchPolicy(timeout_s=0.2, retries=1)
    with pytest.raises(FeedFetchError, match=r"timed out .* after 2 attempts") as info:
        fetch_feed(feed_server.url("/feed"), policy=policy, sleep=sleeps)
    assert info.value.transient is True
    assert isinstance(info.value.__cause__, httpx.TimeoutException)
    assert sleeps == [1.0]


def test_trickling_body_hits_the_attempt_deadline(feed_server: FeedServer) -> None:
    """Bytes that keep coming, each within timeout_s, still cannot outlast deadline_s."""
    feed_server.route(
        "/feed", Reply(body=b"x" * 400, framing="chunked", chunk_size=10, chunk_delay_s=0.05)
    )
    policy = FetchPolicy(timeout_s=1.0, deadline_s=0.3, retries=0)
    with pytest.raises(
        FeedFetchError,
        match=r"timed out \(body not complete within deadline_s=0.3\) after 1 attempt$",
    ):
        fetch_feed(feed_server.url("/feed"), policy=policy)


def test_connection_refused_is_retried_then_an_error(sleeps: Sleeps) -> None:
    """Nobody listening: connection errors are retried, then reported."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FeedFetchError, match=r"connection failed .* after 3 attempts"):
        fetch_feed(f"http://127.0.0.1:{port}/feed", policy=FAST, sleep=sleeps)
    assert sleeps == [1.0, 2.0]


def test_body_at_the_limit_is_accepted(feed_server: FeedServer) -> None:
    """max_bytes is inclusive."""
    feed_server.route("/feed", Reply(body=b"x" * 1000, framing="chunked"))
    assert (
        len(fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(max_bytes=1000)).body) == 1000
    )


def test_declared_oversized_body_is_refused_early(feed_server: FeedServer) -> None:
    """An honest Content-Length over max_bytes is refused before reading, without retry."""
    feed_server.route("/feed", Reply(body=b"x" * 50_000))
    with pytest.raises(FeedFetchError, match=r"larger than max_bytes.*Content-Length") as info:
        fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(max_bytes=1000))
    assert info.value.transient is False
    assert feed_server.count("/feed") == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_undeclared_oversized_body_is_aborted(
    feed_server: FeedServer, framing: Literal["chunked", "close"]
) -> None:
    """Without a Content-Length the body is streamed and abandoned once past max_bytes."""
    feed_server.route("/feed", Reply(body=b"x" * 2_000_000, framing=framing))
    with pytest.raises(FeedFetchError, match=r"larger than max_bytes \(1000 bytes\): aborted"):
        fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(max_bytes=1000))


def test_understated_content_length_cannot_sneak_a_big_body(feed_server: FeedServer) -> None:
    """A Content-Length that lies low yields at most what it declared, never more."""
    feed_server.route("/feed", Reply(body=b"x" * 50_000, content_length=100))
    result = fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(max_bytes=1000))
    assert result.body == b"x" * 100


def test_limit_applies_to_the_decoded_body(feed_server: FeedServer) -> None:
    """A small gzip body that inflates past max_bytes is refused (no decompression bomb)."""
    bomb = gzip.compress(b"\0" * 1_000_000)
    feed_server.route("/feed", Reply(body=bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(FeedFetchError, match="aborted after"):
        fetch_feed(feed_server.url("/feed"), policy=FetchPolicy(max_bytes=10_000))


@pytest.mark.parametrize(
    "url", ["ftp://example.com/feed", "file:///etc/passwd", "http://", "example.com/feed", ""]
)
def test_only_http_urls_are_fetched(url: str) -> None:
    """Anything but an http(s) URL with a host is refused before any I/O."""
    with pytest.raises(FeedFetchError, match="invalid URL") as info:
        fetch_feed(url)
    assert info.value.transient is False


def test_given_client_is_used_and_left_open(feed_server: FeedServer) -> None:
    """A caller's client is used (with its own settings) and not closed."""
    feed_server.route("/feed", Reply(body=FEED))
    with httpx.Client(headers={"X-Trace": "t1"}) as client:
        assert fetch_feed(feed_server.url("/feed"), client=client).body == FEED
        assert not client.is_closed
    (seen,) = feed_server.requests
    assert seen.headers["x-trace"] == "t1"


def test_events_are_logged(feed_server: FeedServer, sleeps: Sleeps) -> None:
    """Retries and the final outcome are structlog events with key/values."""

    def handler(request: SeenRequest) -> Reply:
        return Reply(503) if feed_server.count("/feed") == 1 else Reply(body=FEED)

    feed_server.route("/feed", handler)
    with capture_logs() as logs:
        fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    events = [e["event"] for e in logs]
    assert events == ["feed_fetch_attempt_failed", "feed_fetched"]
    assert logs[0]["error"] == "HTTP 503" and logs[0]["wait_s"] == 1.0
    assert logs[1]["outcome"] == "ok" and logs[1]["bytes"] == len(FEED)


def test_policy_rejects_nonsense() -> None:
    """FetchPolicy validates its numbers."""
    with pytest.raises(ValueError, match="timeout_s"):
        FetchPolicy(timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        FetchPolicy(retries=-1)
