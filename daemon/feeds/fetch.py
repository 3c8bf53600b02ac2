"""Fetch one feed over HTTP: conditional GET, redirects, retries and a size limit.

:func:`fetch_feed` does one poll of one URL and says what happened:

- ``OK``: a body (at most ``max_bytes``) with its content type and fresh validators;
- ``NOT_MODIFIED``: the server answered 304 to our ``If-None-Match`` / ``If-Modified-Since``;
- ``GONE``: the server answered 410, the feed should stop being polled.

Anything else raises :class:`FeedFetchError`, whose ``transient`` flag tells a
poller whether trying again later may help (5xx, 408, 429, timeouts and
connection errors after all retries) or not (other 4xx, a body over the limit,
a bad URL, a redirect loop).

Redirects are followed here, not by httpx, so that permanent ones (301, 308) can
be told from temporary ones (302, 303, 307): the URL to store for the next poll
follows the chain only while every hop so far was permanent. ``A -301-> B -302-> C``
stores ``B``; ``A -302-> B -301-> C`` keeps ``A``.

Retries: a retryable failure is tried again ``retries`` more times, waiting
``backoff_s``, then twice that, and so on; a ``Retry-After: <seconds>`` header on
the failed response replaces the computed wait. Every wait is capped at 60 s.
The wait goes through the ``sleep`` argument so tests need not sleep.

Time: ``timeout_s`` bounds each network operation (connect, each read);
``deadline_s`` bounds one whole attempt, body included, so a server that trickles
bytes cannot hold a poll forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx
import structlog

from daemon.errors import FeedFetchError

log = structlog.get_logger()

ACCEPT = (
    "application/feed+json, application/atom+xml, application/rss+xml, "
    "application/json;q=0.9, application/xml;q=0.8, text/xml;q=0.8, */*;q=0.1"
)
_PERMANENT_REDIRECTS = frozenset({301, 308})
_TEMPORARY_REDIRECTS = frozenset({302, 303, 307})
_RETRYABLE_4XX = frozenset({408, 429})
_MAX_WAIT_S = 60.0


@dataclass(frozen=True)
class FetchPolicy:
    """How patient and how trusting one fetch is."""

    timeout_s: float = 10.0
    max_bytes: int = 5 << 20
    user_agent: str = "editd/0.1"
    retries: int = 2  # extra attempts after the first, on retryable failures only
    backoff_s: float = 1.0  # first wait; doubles each retry; Retry-After replaces it
    max_redirects: int = 5
    deadline_s: float = 60.0  # one whole attempt, body included

    def __post_init__(self) -> None:
        for name in ("timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchPolicy.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_bytes", "retries", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchPolicy.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.backoff_s < 0:
            raise ValueError(f"FetchPolicy.backoff_s must be >= 0, got {self.backoff_s!r}")


class FetchOutcome(StrEnum):
    """What one poll of a feed found."""

    OK = "ok"
    NOT_MODIFIED = "not_modified"
    GONE = "gone"


@dataclass(frozen=True)
class FetchResult:
    """The outcome of :func:`fetch_feed`; ``url`` is the one to store for the next poll."""

    outcome: FetchOutcome
    url: str  # the target of a permanent redirect chain (then moved=True), else the one asked
    moved: bool
    status_code: int
    body: bytes  # b"" unless OK
    content_type: str | None
    etag: str | None  # on 304: the server's new ones, else the ones we sent
    last_modified: str | None


class _DeadlineExceeded(httpx.ReadTimeout):
    """An attempt ran past ``deadline_s`` (retried like any timeout)."""


@dataclass(frozen=True)
class _Reply:
    """One HTTP response, with its body read when it was a 2xx."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: httpx.URL


def fetch_feed(
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    policy: FetchPolicy = FetchPolicy(),
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FetchResult:
    """GET ``url`` conditionally, following redirects and retrying; see the module docstring.

    A given ``client`` lends its transport, pool and default headers (and is left open);
    the timeout and redirect handling still come from ``policy``. Without one, a
    client is made and closed.
    """
    start = _check_url(url, url)
    headers = {"User-Agent": policy.user_agent, "Accept": ACCEPT}
    if etag is not None:
        headers["If-None-Match"] = etag
    if last_modified is not None:
        headers["If-Modified-Since"] = last_modified
    http = client if client is not None else httpx.Client(timeout=policy.timeout_s)
    began = time.monotonic()
    try:
        stored, moved, reply = _follow(http, url, start, headers, policy, sleep)
        result = _result(reply, url, stored, moved, etag, last_modified)
    except FeedFetchError as exc:
        log.warning("feed_fetch_failed", url=url, error=exc.reason, transient=exc.transient)
        raise
    finally:
        if client is None:
            http.close()
    log.info(
        "feed_fetched",
        url=url,
        outcome=result.outcome.value,
        status_code=result.status_code,
        stored_url=result.url,
        moved=result.moved,
        bytes=len(result.body),
        elapsed_ms=round((time.monotonic() - began) * 1000, 1),
    )
    return result


def _check_url(text: str, asked: str) -> httpx.URL:
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FeedFetchError(f"invalid URL {text!r}: {exc}", url=asked) from exc
    if parsed.scheme not in ("http", "https"):
        raise FeedFetchError(
            f"invalid URL {text!r}: scheme {parsed.scheme!r} is not http or https", url=asked
        )
    if not parsed.host:
        raise FeedFetchError(f"invalid URL {text!r}: no host", url=asked)
    return parsed


def _follow(
    http: httpx.Client,
    asked: str,
    start: httpx.URL,
    headers: dict[str, str],
    policy: FetchPolicy,
    sleep: Callable[[float], None],
) -> tuple[str, bool, _Reply]:
    """Follow the redirect chain from ``start``: (URL to store, moved, final reply)."""
    current, stored, moved, all_permanent = start, asked, False, True
    chain = [str(start)]
    for _hop in range(policy.max_redirects + 1):
        reply = _get_with_retries(http, asked, current, headers, policy, sleep)
        if reply.status not in _PERMANENT_REDIRECTS | _TEMPORARY_REDIRECTS:
            return stored, moved, reply
        location = reply.headers.get("location")
        if not location:
            raise FeedFetchError(
                f"HTTP {reply.status} redirect without a Location header",
                url=asked,
                status_code=reply.status,
            )
        target = _check_url(str(reply.url.join(location)), asked)
        permanent = reply.status in _PERMANENT_REDIRECTS
        all_permanent = all_permanent and permanent
        if all_permanent:
            stored, moved = str(target), True
        log.info(
            "feed_redirected",
            url=asked,
            to=str(target),
            status_code=reply.status,
            permanent=permanent,
        )
        if str(target) in chain:
            raise FeedFetchError(
                f"redirect loop: {' -> '.join([*chain, str(target)])}",
                url=asked,
                status_code=reply.status,
            )
        chain.append(str(target))
        current = target
    raise FeedFetchError(
        f"too many redirects (more than {policy.max_redirects}): {' -> '.join(chain)}", url=asked
    )


def _get_with_retries(
    http: httpx.Client,
    asked: str,
    url: httpx.URL,
    headers: dict[str, str],
    policy: FetchPolicy,
    sleep: Callable[[float], None],
) -> _Reply:
    """One GET of ``url``, retried on 5xx, 408, 429, timeouts and connection errors."""
    attempts = 1 + policy.retries
    for attempt in range(1, attempts + 1):
        retry_after: float | None = None
        status: int | None = None
        cause: Exception | None = None
        try:
            reply = _get_once(http, asked, url, headers, policy)
        except httpx.TimeoutException as exc:
            limit = str(exc) if isinstance(exc, _DeadlineExceeded) else None
            failure = f"timed out ({limit or f'timeout_s={policy.timeout_s:g}'})"
            cause = exc
        except httpx.TransportError as exc:
            failure, cause = f"connection failed ({type(exc).__name__}: {exc})", exc
        else:
            if not _retryable_status(reply.status):
                return reply
            status, failure = reply.status, f"HTTP {reply.status}"
            retry_after = _retry_after(reply.headers)
        if attempt == attempts:
            raise FeedFetchError(
                f"{failure} after {attempts} attempt{'s' if attempts > 1 else ''}",
                url=asked,
                status_code=status,
                attempts=attempts,
                transient=True,
            ) from cause
        wait = retry_after if retry_after is not None else policy.backoff_s * 2 ** (attempt - 1)
        wait = min(wait, _MAX_WAIT_S)
        log.warning(
            "feed_fetch_attempt_failed", url=str(url), attempt=attempt, error=failure, wait_s=wait
        )
        sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_4XX


def _retry_after(headers: httpx.Headers) -> float | None:
    """The seconds form of ``Retry-After``; the HTTP-date form is ignored."""
    value = headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


def _get_once(
    http: httpx.Client, asked: str, url: httpx.URL, headers: dict[str, str], policy: FetchPolicy
) -> _Reply:
    """One GET; the body is read (and size-checked) only for a 2xx."""
    deadline = time.monotonic() + policy.deadline_s
    try:
        with http.stream(
            "GET", url, headers=headers, follow_redirects=False, timeout=policy.timeout_s
        ) as response:
            if not response.is_success:
                return _Reply(response.status_code, response.headers, b"", response.url)
            body = _read_limited(response, asked, policy, deadline)
            return _Reply(response.status_code, response.headers, body, response.url)
    except httpx.TransportError:
        raise
    except httpx.HTTPError as exc:  # e.g. a body that does not decode as its Content-Encoding
        raise FeedFetchError(f"bad response ({type(exc).__name__}: {exc})", url=asked) from exc


def _read_limited(
    response: httpx.Response, asked: str, policy: FetchPolicy, deadline: float
) -> bytes:
    """Read the (decoded) body, refusing it as soon as it is known to exceed ``max_bytes``."""
    too_large = f"response larger than max_bytes ({policy.max_bytes} bytes)"
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FeedFetchError(
            f"{too_large}: Content-Length is {declared}",
            url=asked,
            status_code=response.status_code,
        )
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > policy.max_bytes:
            raise FeedFetchError(
                f"{too_large}: aborted after {size} bytes",
                url=asked,
                status_code=response.status_code,
            )
        if time.monotonic() > deadline:
            raise _DeadlineExceeded(
                f"body not complete within deadline_s={policy.deadline_s:g}",
                request=response.request,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _result(
    reply: _Reply,
    asked: str,
    stored: str,
    moved: bool,
    etag: str | None,
    last_modified: str | None,
) -> FetchResult:
    """Turn the final (non-redirect, non-retryable) reply into a result or an error."""
    status, headers = reply.status, reply.headers
    content_type = headers.get("content-type")
    if 200 <= status < 300:
        outcome, body = FetchOutcome.OK, reply.body
        etag, last_modified = headers.get("etag"), headers.get("last-modified")
    elif status == 304:
        outcome, body = FetchOutcome.NOT_MODIFIED, b""
        etag = headers.get("etag", etag)
        last_modified = headers.get("last-modified", last_modified)
    elif status == 410:
        outcome, body, etag, last_modified = FetchOutcome.GONE, b"", None, None
    else:
        raise FeedFetchError(f"HTTP {status}", url=asked, status_code=status)
    return FetchResult(
        outcome=outcome,
        url=stored,
        moved=moved,
        status_code=status,
        body=body,
        content_type=content_type,
        etag=etag,
        last_modified=last_modified,
    )
