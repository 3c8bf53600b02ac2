"""fetch_feed against a real local HTTP server: validators, redirects, retries, limits."""

from __future__ import annotations

import functools
import gzip
import ipaddress
import re
import socket
import ssl
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any, Literal

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.errors import FeedFetchError
from daemon.feeds.fetch import FetchOutcome, FetchPolicy, fetch_feed
from tests.daemon.feeds.conftest import FeedServer, Reply, SeenRequest

FEED = b'{"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": []}'
ETAG = '"v1"'
HTTP_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"
LOOPBACK = ("127.0.0.1",)  # the test server's address: allowed, as [feeds] allow_hosts would


def local(**fields: Any) -> FetchPolicy:
    """A policy that may fetch from the loopback test server."""
    return FetchPolicy(allow_hosts=LOOPBACK, **fields)


LOCAL = local()
FAST = local(timeout_s=2.0, backoff_s=1.0)


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
    fetch_feed(feed_server.url("/feed"), policy=local(user_agent="editd-test/9"))
    (seen,) = feed_server.requests
    assert seen.headers["user-agent"] == "editd-test/9"
    for media_type in ("application/feed+json", "application/atom+xml", "application/rss+xml"):
        assert media_type in seen.headers["accept"]
    assert "if-none-match" not in seen.headers
    assert "if-modified-since" not in seen.headers


def test_conditional_get_sends_validators_and_gets_not_modified(feed_server: FeedServer) -> None:
    """Stored validators go out as If-None-Match / If-Modified-Since; a 304 is NOT_MODIFIED."""
    feed_server.route("/feed", Reply(body=FEED, etag=ETAG))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG, last_modified=HTTP_DATE, policy=LOCAL)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.status_code, result.body) == (304, b"")
    assert (result.etag, result.last_modified) == (ETAG, HTTP_DATE)
    (seen,) = feed_server.requests
    assert seen.headers["if-none-match"] == ETAG
    assert seen.headers["if-modified-since"] == HTTP_DATE


def test_not_modified_by_last_modified_alone(feed_server: FeedServer) -> None:
    """If-Modified-Since alone can earn a 304; the validator we sent is kept."""
    feed_server.route("/feed", Reply(body=FEED, last_modified=HTTP_DATE))
    result = fetch_feed(feed_server.url("/feed"), last_modified=HTTP_DATE, policy=LOCAL)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.etag, result.last_modified) == (None, HTTP_DATE)


def test_not_modified_takes_new_validators_from_the_server(feed_server: FeedServer) -> None:
    """On a 304 that carries a new ETag, the new one is returned."""
    feed_server.route("/feed", Reply(304, etag='"v2"'))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG, last_modified=HTTP_DATE, policy=LOCAL)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert (result.etag, result.last_modified) == ('"v2"', HTTP_DATE)


def test_changed_feed_returns_ok_with_new_etag(feed_server: FeedServer) -> None:
    """A stale ETag gets the full body and the new ETag."""
    feed_server.route("/feed", Reply(body=FEED, etag='"v2"'))
    result = fetch_feed(feed_server.url("/feed"), etag=ETAG, policy=LOCAL)
    assert result.outcome is FetchOutcome.OK
    assert result.etag == '"v2"'


@pytest.mark.parametrize("status", [301, 308])
def test_permanent_redirect_updates_the_url(feed_server: FeedServer, status: int) -> None:
    """301 and 308 are followed and their target is the URL to store."""
    feed_server.redirect("/old", "/feed", status=status)
    feed_server.route("/feed", Reply(body=FEED))
    result = fetch_feed(feed_server.url("/old"), policy=LOCAL)
    assert result.outcome is FetchOutcome.OK
    assert (result.url, result.moved) == (feed_server.url("/feed"), True)
    assert result.body == FEED


@pytest.mark.parametrize("status", [302, 303, 307])
def test_temporary_redirect_keeps_the_url(feed_server: FeedServer, status: int) -> None:
    """302, 303 and 307 are followed but the requested URL stays the one to store."""
    feed_server.redirect("/old", "/feed", status=status)
    feed_server.route("/feed", Reply(body=FEED))
    url = feed_server.url("/old")
    result = fetch_feed(url, policy=LOCAL)
    assert result.body == FEED
    assert (result.url, result.moved) == (url, False)


def test_permanent_then_temporary_stores_the_permanent_target(feed_server: FeedServer) -> None:
    """In a 301 -> 302 chain only the 301's target is stored."""
    feed_server.redirect("/a", "/b", status=301)
    feed_server.redirect("/b", "/c", status=302)
    feed_server.route("/c", Reply(body=FEED))
    result = fetch_feed(feed_server.url("/a"), policy=LOCAL)
    assert result.body == FEED
    assert (result.url, result.moved) == (feed_server.url("/b"), True)


def test_temporary_then_permanent_keeps_the_requested_url(feed_server: FeedServer) -> None:
    """Once a hop was temporary, later permanent hops do not move the stored URL."""
    feed_server.redirect("/a", "/b", status=302)
    feed_server.redirect("/b", "/c", status=301)
    feed_server.route("/c", Reply(body=FEED))
    url = feed_server.url("/a")
    result = fetch_feed(url, policy=LOCAL)
    assert (result.url, result.moved, result.body) == (url, False, FEED)


def test_redirect_keeps_the_validators(feed_server: FeedServer) -> None:
    """The conditional headers go to the redirect target too."""
    feed_server.redirect("/old", "/feed", status=301)
    feed_server.route("/feed", Reply(body=FEED, etag=ETAG))
    result = fetch_feed(feed_server.url("/old"), etag=ETAG, policy=LOCAL)
    assert result.outcome is FetchOutcome.NOT_MODIFIED
    assert result.url == feed_server.url("/feed")
    assert feed_server.requests_to("/feed")[0].headers["if-none-match"] == ETAG


def test_redirect_loop_is_an_error(feed_server: FeedServer) -> None:
    """A -> B -> A is refused as a loop, without waiting for the redirect limit."""
    feed_server.redirect("/a", "/b", status=302)
    feed_server.redirect("/b", "/a", status=302)
    with pytest.raises(FeedFetchError, match="redirect loop") as info:
        fetch_feed(feed_server.url("/a"), policy=LOCAL)
    assert info.value.transient is False
    assert len(feed_server.requests) == 2


def test_too_many_redirects_is_an_error(feed_server: FeedServer) -> None:
    """A chain longer than max_redirects is refused."""
    for hop in range(5):
        feed_server.redirect(f"/r{hop}", f"/r{hop + 1}", status=301)
    feed_server.route("/r5", Reply(body=FEED))
    policy = local(max_redirects=3)
    with pytest.raises(FeedFetchError, match=r"too many redirects \(more than 3\)"):
        fetch_feed(feed_server.url("/r0"), policy=policy)
    assert len(feed_server.requests) == 4
    assert fetch_feed(feed_server.url("/r0"), policy=LOCAL).url == feed_server.url("/r5")


def test_redirect_to_another_scheme_is_an_error(feed_server: FeedServer) -> None:
    """A Location outside http(s) is refused."""
    feed_server.redirect("/a", "file:///etc/passwd", status=301)
    with pytest.raises(FeedFetchError, match="not http or https"):
        fetch_feed(feed_server.url("/a"), policy=LOCAL)


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
    policy = local(backoff_s=0.5)
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
    policy = local(timeout_s=0.2, retries=1)
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
    policy = local(timeout_s=1.0, deadline_s=0.3, retries=0)
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
    assert len(fetch_feed(feed_server.url("/feed"), policy=local(max_bytes=1000)).body) == 1000


def test_declared_oversized_body_is_refused_early(feed_server: FeedServer) -> None:
    """An honest Content-Length over max_bytes is refused before reading, without retry."""
    feed_server.route("/feed", Reply(body=b"x" * 50_000))
    with pytest.raises(FeedFetchError, match=r"larger than max_bytes.*Content-Length") as info:
        fetch_feed(feed_server.url("/feed"), policy=local(max_bytes=1000))
    assert info.value.transient is False
    assert feed_server.count("/feed") == 1


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_undeclared_oversized_body_is_aborted(
    feed_server: FeedServer, framing: Literal["chunked", "close"]
) -> None:
    """Without a Content-Length the body is streamed and abandoned once past max_bytes."""
    feed_server.route("/feed", Reply(body=b"x" * 2_000_000, framing=framing))
    with pytest.raises(FeedFetchError, match=r"larger than max_bytes \(1000 bytes\): aborted"):
        fetch_feed(feed_server.url("/feed"), policy=local(max_bytes=1000))


def test_understated_content_length_cannot_sneak_a_big_body(feed_server: FeedServer) -> None:
    """A Content-Length that lies low yields at most what it declared, never more."""
    feed_server.route("/feed", Reply(body=b"x" * 50_000, content_length=100))
    result = fetch_feed(feed_server.url("/feed"), policy=local(max_bytes=1000))
    assert result.body == b"x" * 100


def test_limit_applies_to_the_decoded_body(feed_server: FeedServer) -> None:
    """A small gzip body that inflates past max_bytes is refused (no decompression bomb)."""
    bomb = gzip.compress(b"\0" * 1_000_000)
    feed_server.route("/feed", Reply(body=bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(FeedFetchError, match="aborted after"):
        fetch_feed(feed_server.url("/feed"), policy=local(max_bytes=10_000))


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
        assert fetch_feed(feed_server.url("/feed"), client=client, policy=LOCAL).body == FEED
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


# --- compressed bodies ------------------------------------------------------------------

BOMB_BYTES = 8 << 20  # what the bombs below inflate to
BOMB_LIMIT = 64 << 10  # max_bytes for the bomb tests
PEAK_LIMIT = 1 << 20  # the most a refused bomb may take in Python memory


def compress(data: bytes, coding: str) -> bytes:
    """``data`` as ``coding`` (``deflate-raw``: deflate without its zlib wrapper)."""
    if coding == "gzip":
        return gzip.compress(data, compresslevel=9)
    packer = zlib.compressobj(9, wbits=-zlib.MAX_WBITS if coding == "deflate-raw" else 15)
    return packer.compress(data) + packer.flush()


@functools.cache
def bomb(coding: str) -> bytes:
    return compress(bytes(BOMB_BYTES), coding)


def peak_while(call: Callable[[], object]) -> tuple[int, BaseException | None]:
    """The peak of Python memory allocated while ``call`` runs, and what it raised."""
    raised: BaseException | None = None
    tracemalloc.start()
    try:
        call()
    except FeedFetchError as exc:
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw"])
def test_compressed_body_is_decoded_and_a_bomb_is_refused_unexpanded(
    feed_server: FeedServer, coding: str
) -> None:
    """gzip and deflate (zlib-wrapped or raw) bodies decode; one that inflates past
    max_bytes is refused having inflated only about max_bytes, not the whole bomb."""
    header = {"Content-Encoding": coding.removesuffix("-raw")}
    feed_server.route("/feed", Reply(body=compress(FEED, coding), headers=header))
    body = bomb(coding)
    feed_server.route("/bomb", Reply(body=body, headers=header, chunk_size=len(body)))
    policy = local(max_bytes=BOMB_LIMIT, retries=0)
    with httpx.Client() as client:
        assert fetch_feed(feed_server.url("/feed"), policy=policy, client=client).body == FEED
        peak, raised = peak_while(
            lambda: fetch_feed(feed_server.url("/bomb"), policy=policy, client=client)
        )
    assert isinstance(raised, FeedFetchError)
    assert raised.reason == (
        f"response larger than max_bytes ({BOMB_LIMIT} bytes): aborted after "
        f"{BOMB_LIMIT + 1} bytes (decompressed from {coding.removesuffix('-raw')})"
    )
    assert raised.transient is False
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated for a {BOMB_LIMIT}-byte limit"


@pytest.mark.parametrize(
    ("coding", "body", "why"),
    [
        ("gzip, gzip", gzip.compress(gzip.compress(bytes(BOMB_BYTES))), "stacked codings"),
        ("deflate, gzip", gzip.compress(compress(bytes(BOMB_BYTES), "deflate")), "stacked"),
        ("br", FEED, "an unsupported coding"),
        ("compress", FEED, "an unsupported coding"),
    ],
)
def test_stacked_or_unknown_codings_are_refused(
    feed_server: FeedServer, coding: str, body: bytes, why: str
) -> None:
    """Only one coding, gzip or deflate, is accepted: a double-gzipped bomb is refused
    before anything is inflated, and an unknown coding is not taken for plain bytes."""
    feed_server.route("/feed", Reply(body=body, headers={"Content-Encoding": coding}))
    with httpx.Client() as client:
        peak, raised = peak_while(
            lambda: fetch_feed(feed_server.url("/feed"), policy=local(retries=0), client=client)
        )
    assert isinstance(raised, FeedFetchError)
    assert f"Content-Encoding '{coding}' refused ({why}" in raised.reason
    assert "accepted: gzip, deflate" in raised.reason
    assert peak < PEAK_LIMIT
    (seen,) = feed_server.requests
    assert seen.headers["accept-encoding"] == "gzip, deflate"


def test_corrupt_gzip_is_a_bad_response(feed_server: FeedServer) -> None:
    """A body that is not what its Content-Encoding says is refused, naming the coding."""
    feed_server.route("/feed", Reply(body=b"not gzip at all", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(FeedFetchError, match=r"bad response \(body is not valid gzip: "):
        fetch_feed(feed_server.url("/feed"), policy=LOCAL)


# --- which hosts may be fetched -----------------------------------------------------------

NO_RETRY = FetchPolicy(timeout_s=0.5, retries=0)  # nothing allowed beyond public addresses


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 (link-local)"),
        ("http://10.1.2.3/feed", "10.1.2.3 (private)"),
        ("http://192.168.0.1/feed", "192.168.0.1 (private)"),
        ("http://100.64.0.1/feed", "100.64.0.1 (not globally routable)"),
        ("http://0.0.0.0/feed", "0.0.0.0 (unspecified)"),
        ("http://224.0.0.1/feed", "224.0.0.1 (multicast)"),
        ("http://240.0.0.1/feed", "240.0.0.1 (reserved)"),
        ("http://[::1]/feed", "::1 (loopback)"),
        ("http://[fe80::1]/feed", "fe80::1 (link-local)"),
        ("http://[fd00::1]/feed", "fd00::1 (private)"),
        (
            "http://[::ffff:127.0.0.1]/feed",
            f"{ipaddress.ip_address('::ffff:127.0.0.1')} (loopback, embedded in IPv6)",
        ),
        ("http://[2002:a00:1::]/feed", "2002:a00:1:: (private, embedded in IPv6)"),
        ("http://localhost/feed", "localhost: it resolves to 127.0.0.1 (loopback)"),
        ("http://2130706433/feed", "2130706433: it resolves to 127.0.0.1 (loopback)"),
    ],
)
def test_non_public_targets_are_refused_by_default(url: str, refusal: str) -> None:
    """Loopback, private, link-local, unspecified, multicast and reserved addresses, given
    as IPs or as names that resolve to them, are refused before connecting."""
    with pytest.raises(FeedFetchError) as info:
        fetch_feed(url, policy=NO_RETRY)
    assert info.value.reason == (
        f"refused {refusal}, not a public address; add it to [feeds] allow_hosts to fetch from it"
    )
    assert info.value.transient is False


def test_the_loopback_server_is_refused_without_the_allow_list(feed_server: FeedServer) -> None:
    """Without allow_hosts the local server is never contacted."""
    feed_server.route("/feed", Reply(body=FEED))
    with pytest.raises(FeedFetchError, match=r"refused 127\.0\.0\.1 \(loopback\)"):
        fetch_feed(feed_server.url("/feed"), policy=NO_RETRY)
    assert feed_server.requests == []


@pytest.mark.parametrize(
    ("location", "refusal"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254 (link-local)"),
        ("http://[::1]:{port}/feed", "::1 (loopback)"),
        ("http://2130706434:{port}/feed", "2130706434: it resolves to 127.0.0.2 (loopback)"),
    ],
)
@pytest.mark.parametrize("status", [301, 302])
def test_redirect_to_a_non_public_target_is_refused(
    feed_server: FeedServer, sleeps: Sleeps, location: str, refusal: str, status: int
) -> None:
    """Every hop is checked: an allowed feed cannot redirect to a non-public address
    (here 127.0.0.1 alone is allowed, not the rest of the loopback range)."""
    feed_server.redirect("/feed", location.format(port=feed_server.port), status=status)
    with pytest.raises(FeedFetchError, match=re.escape(f"refused {refusal}, not a public")):
        fetch_feed(feed_server.url("/feed"), policy=FAST, sleep=sleeps)
    assert feed_server.count("/feed") == 1 and len(feed_server.requests) == 1
    assert sleeps == []


@pytest.mark.parametrize(
    "allow", [("localhost",), ("LOCALHOST.",), ("127.0.0.0/8", "::1"), ("127.0.0.1", "::1/128")]
)
def test_allow_hosts_takes_names_and_networks(
    feed_server: FeedServer, allow: tuple[str, ...]
) -> None:
    """A name in allow_hosts is trusted as it is; with networks, every address the name
    resolves to must be inside one. The request still names the host."""
    feed_server.route("/feed", Reply(body=FEED))
    url = f"http://localhost:{feed_server.port}/feed"
    result = fetch_feed(url, policy=FetchPolicy(allow_hosts=allow))
    assert (result.body, result.url) == (FEED, url)
    assert feed_server.requests[-1].headers["host"] == f"localhost:{feed_server.port}"


@pytest.mark.parametrize("entry", ["http://feeds.lan", "10.0.0.0/33", "feeds.lan:8080", "*", ""])
def test_allow_hosts_entries_are_validated(entry: str) -> None:
    """A bad allow_hosts entry is refused when the policy is made, naming it."""
    with pytest.raises(ValueError, match=r"allow_hosts\[1\] must be a host name, an IP"):
        FetchPolicy(allow_hosts=("127.0.0.1", entry))


def test_the_checked_address_is_the_one_connected_to(
    feed_server: FeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a name that resolves to an allowed address for the check and to
    another one right after is still fetched from the checked address (the request goes
    to that address with the name in Host), never resolved a second time."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "169.254.169.254"])

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "feeds.example":
            return real(next(answers, "169.254.169.254"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    feed_server.route("/feed", Reply(body=FEED))
    url = f"http://feeds.example:{feed_server.port}/feed"
    assert fetch_feed(url, policy=local(timeout_s=0.5, retries=0)).body == FEED
    assert feed_server.requests[0].headers["host"] == f"feeds.example:{feed_server.port}"


def test_a_redirect_from_https_to_http_is_refused(
    tls_feed_server: FeedServer, feed_server: FeedServer, tls_client_context: ssl.SSLContext
) -> None:
    """A feed never loses TLS: an https -> http redirect is not followed (so not stored)."""
    tls_feed_server.route("/ok", Reply(body=FEED))
    tls_feed_server.redirect("/feed", feed_server.url("/feed"), status=301)
    feed_server.route("/feed", Reply(body=FEED))
    with httpx.Client(verify=tls_client_context) as client:
        assert fetch_feed(tls_feed_server.url("/ok"), policy=LOCAL, client=client).body == FEED
        with pytest.raises(FeedFetchError) as info:
            fetch_feed(tls_feed_server.url("/feed"), policy=LOCAL, client=client)
    assert info.value.reason == (
        f"redirect from https to http refused "
        f"({tls_feed_server.url('/feed')} -> {feed_server.url('/feed')})"
    )
    assert (info.value.status_code, info.value.transient) == (301, False)
    assert feed_server.requests == []


def test_tls_goes_to_the_checked_address_with_the_name_for_sni(
    tls_feed_server: FeedServer, tls_client_context: ssl.SSLContext
) -> None:
    """An https name checked against a network is connected to by address, and the
    certificate is still verified against the name (SNI and Host carry it)."""
    tls_feed_server.route("/feed", Reply(body=FEED))
    url = f"https://localhost:{tls_feed_server.port}/feed"
    policy = FetchPolicy(allow_hosts=("127.0.0.0/8", "::1"))
    with httpx.Client(verify=tls_client_context) as client:
        assert fetch_feed(url, policy=policy, client=client).body == FEED
    assert tls_feed_server.requests[0].headers["host"] == f"localhost:{tls_feed_server.port}"


def test_behind_an_environment_proxy_the_proxy_resolves(
    feed_server: FeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set (the test server proxies plain HTTP: it serves by path), a name
    only the proxy can resolve goes through it; a name we resolve to a non-public address
    is still refused before the proxy is asked."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", feed_server.url())
    feed_server.route("/feed", Reply(body=FEED))
    assert fetch_feed("http://feeds.invalid/feed", policy=NO_RETRY).body == FEED
    assert feed_server.requests[0].path == "http://feeds.invalid/feed"
    with pytest.raises(FeedFetchError, match=r"refused localhost: it resolves to 127\.0\.0\.1"):
        fetch_feed("http://localhost/feed", policy=NO_RETRY)
    assert len(feed_server.requests) == 1
