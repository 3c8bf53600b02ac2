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

Size: ``max_bytes`` bounds the body both as sent and as decompressed. Only
``gzip`` and ``deflate`` are asked for and accepted, one coding at most (stacked or
unknown codings are refused), and they are decompressed here, never more than
``max_bytes`` + 1 bytes in all, so a small compressed body cannot inflate in memory.

Targets: only public addresses are fetched, unless ``allow_hosts`` (host names, IP
addresses or CIDR networks) lets a non-public one through. The check runs before
every request (the first URL, every redirect hop, every retry): an IP host is
checked as it is, a host name is resolved and every address it resolves to must
pass. The request then goes to the checked address (with the name in ``Host`` and
in TLS SNI), so the name cannot resolve elsewhere between the check and the
connection. A host name in ``allow_hosts`` is trusted whatever it resolves to.
Behind a proxy from the environment (``HTTP(S)_PROXY``) the proxy resolves the
name itself: the check runs on our own resolution when there is one, and the
proxy's own rules are the real guard. A redirect from https to
http is refused, so a feed never loses TLS (nor is such a URL ever stored).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import time
import urllib.request
import zlib
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
ACCEPT_ENCODING = "gzip, deflate"
_INFLATE_STEP = 64 << 10  # bytes of decompressed output per zlib call
_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?", re.IGNORECASE)
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class _AllowList:
    """``[feeds] allow_hosts``: names trusted whatever they resolve to, and networks."""

    names: frozenset[str]
    networks: tuple[_IPNetwork, ...]

    def allows(self, address: _IPAddress) -> bool:
        return any(address in network for network in self.networks)


@functools.lru_cache(maxsize=16)
def _allow_list(entries: tuple[str, ...]) -> _AllowList:
    names: set[str] = set()
    networks: list[_IPNetwork] = []
    for index, entry in enumerate(entries):
        text = entry.strip() if isinstance(entry, str) else ""
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.fullmatch(text):
            raise ValueError(
                f"FetchPolicy.allow_hosts[{index}] must be a host name, an IP address or a "
                f"CIDR network (e.g. '10.0.0.0/8'), got {entry!r}"
            )
        names.add(text.lower().rstrip("."))
    return _AllowList(frozenset(names), tuple(networks))


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
    allow_hosts: tuple[str, ...] = ()  # host names / IPs / CIDR networks that may be non-public

    def __post_init__(self) -> None:
        for name in ("timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchPolicy.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_bytes", "retries", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchPolicy.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.backoff_s < 0:
            raise ValueError(f"FetchPolicy.backoff_s must be >= 0, got {self.backoff_s!r}")
        _allow_list(tuple(self.allow_hosts))  # raises ValueError naming a bad entry


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
    headers = {
        "User-Agent": policy.user_agent,
        "Accept": ACCEPT,
        "Accept-Encoding": ACCEPT_ENCODING,
    }
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
        if current.scheme == "https" and target.scheme != "https":
            raise FeedFetchError(
                f"redirect from https to {target.scheme} refused ({current} -> {target})",
                url=asked,
                status_code=reply.status,
            )
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
    """One GET of ``url`` (after the target check), trying each checked address in turn
    while the connection is refused; the body is read (and size-checked) only for a 2xx."""
    deadline = time.monotonic() + policy.deadline_s
    routes = _routes(url, asked, policy)
    for index, route in enumerate(routes):
        try:
            return _get_via(http, asked, url, route, headers, policy, deadline)
        except httpx.ConnectError:
            if index + 1 == len(routes) or time.monotonic() > deadline:
                raise
    raise AssertionError("unreachable")  # pragma: no cover - routes is never empty


def _get_via(
    http: httpx.Client,
    asked: str,
    url: httpx.URL,
    route: _Route,
    headers: dict[str, str],
    policy: FetchPolicy,
    deadline: float,
) -> _Reply:
    if route.host_header is not None:
        headers = {**headers, "Host": route.host_header}
    extensions = {"sni_hostname": route.sni_hostname} if route.sni_hostname else None
    try:
        with http.stream(
            "GET",
            route.url,
            headers=headers,
            follow_redirects=False,
            timeout=policy.timeout_s,
            extensions=extensions,
        ) as response:
            if not response.is_success:
                return _Reply(response.status_code, response.headers, b"", url)
            body = _read_limited(response, asked, policy, deadline)
            return _Reply(response.status_code, response.headers, body, url)
    except httpx.TransportError:
        raise
    except httpx.HTTPError as exc:  # e.g. a malformed chunked body
        raise FeedFetchError(f"bad response ({type(exc).__name__}: {exc})", url=asked) from exc


def _read_limited(
    response: httpx.Response, asked: str, policy: FetchPolicy, deadline: float
) -> bytes:
    """Read and decode the body, refusing it as soon as it is known to exceed ``max_bytes``
    as sent or as decoded; never decodes more than ``max_bytes`` + 1 bytes."""
    too_large = f"response larger than max_bytes ({policy.max_bytes} bytes)"
    status = response.status_code
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FeedFetchError(
            f"{too_large}: Content-Length is {declared}", url=asked, status_code=status
        )
    decoder = _decoder(response.headers, asked, status, policy.max_bytes)
    chunks: list[bytes] = []
    sent = 0

    def check_size() -> None:
        size = max(sent, decoder.produced)
        if size > policy.max_bytes:
            raise FeedFetchError(
                f"{too_large}: aborted after {size} bytes{decoder.described}",
                url=asked,
                status_code=status,
            )

    for raw in response.iter_raw():
        sent += len(raw)
        chunks.extend(decoder.decode(raw))
        check_size()
        if time.monotonic() > deadline:
            raise _DeadlineExceeded(
                f"body not complete within deadline_s={policy.deadline_s:g}",
                request=response.request,
            )
    chunks.extend(decoder.flush())
    check_size()
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


# --- which hosts may be fetched ------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """Where one GET goes: ``url``, or that URL with its host replaced by a checked address
    (then ``host_header`` and ``sni_hostname`` keep the name the server expects)."""

    url: httpx.URL
    host_header: str | None = None
    sni_hostname: str | None = None


def _routes(url: httpx.URL, asked: str, policy: FetchPolicy) -> list[_Route]:
    """The checked ways to reach ``url``; raises FeedFetchError for a non-public target."""
    host = url.raw_host.decode("ascii").lower()
    allowed = _allow_list(tuple(policy.allow_hosts))
    if host.rstrip(".") in allowed.names:
        return [_Route(url)]
    literal = _ip_address(host)
    if literal is not None:
        _check_address(literal, None, asked, allowed)
        return [_Route(url)]
    proxied = _proxied(url, host)
    try:
        addresses = _resolve(url, host)
    except httpx.ConnectError:
        if proxied:
            return [_Route(url)]  # only the proxy can resolve it
        raise
    for address in addresses:
        _check_address(address, host, asked, allowed)
    if proxied:
        return [_Route(url)]  # the proxy resolves the name again and connects
    host_header = url.netloc.decode("ascii")
    sni = host.rstrip(".") if url.scheme == "https" else None
    return [_Route(url.copy_with(host=str(a)), host_header, sni) for a in addresses]


def _check_address(address: _IPAddress, name: str | None, asked: str, allowed: _AllowList) -> None:
    """Refuse ``address`` (which ``name`` resolved to, if any) unless public or allowed."""
    if allowed.allows(address):
        return
    kind = _non_public(address)
    if kind is None:
        return
    subject = f"{name}: it resolves to {address} ({kind})" if name else f"{address} ({kind})"
    raise FeedFetchError(
        f"refused {subject}, not a public address; add it to [feeds] allow_hosts to fetch from it",
        url=asked,
    )


def _non_public(address: _IPAddress) -> str | None:
    """What kind of non-public address ``address`` is, or ``None`` for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            kind = _non_public(embedded)
            return None if kind is None else f"{kind}, embedded in IPv6"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "not globally routable"


def _ip_address(host: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(url: httpx.URL, host: str) -> list[_IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order (duplicates dropped)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
    found: dict[_IPAddress, None] = {}
    for info in infos:
        address = _ip_address(str(info[4][0]).split("%", 1)[0])
        if address is not None:
            found[address] = None
    if not found:
        raise httpx.ConnectError(f"cannot resolve {host}: no IP address")
    return list(found)


def _proxied(url: httpx.URL, host: str) -> bool:
    """Whether a proxy from the environment carries requests to ``url`` (as httpx's
    clients do by default)."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(host)


# --- decoding the body ----------------------------------------------------------------


class _BodyDecoder:
    """Decodes a body as its Content-Encoding says (none, gzip or deflate), counting what
    it produces; decompression stops one byte past ``limit`` in all, which tells the
    caller the body is too large without inflating the rest."""

    def __init__(self, coding: str | None, limit: int, asked: str, status: int) -> None:
        self.coding, self.limit, self.asked, self.status = coding, limit, asked, status
        self.produced = 0
        self.described = f" (decompressed from {coding})" if coding else ""
        self._zlib = zlib.decompressobj(_WBITS[coding]) if coding else None
        self._first = True

    def decode(self, data: bytes) -> list[bytes]:
        """``data`` decoded, in pieces of at most 64 KiB (so nothing is copied whole)."""
        if self._zlib is None:
            self.produced += len(data)
            return [data]
        first, self._first = self._first, False
        try:
            return self._inflate(data)
        except zlib.error as exc:
            if not (first and self.coding == "deflate"):
                raise self._error(exc) from exc
        # "deflate" without the zlib wrapper, as some servers send it
        self._zlib, self.produced = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            return self._inflate(data)
        except zlib.error as exc:
            raise self._error(exc) from exc

    def flush(self) -> list[bytes]:
        try:
            return self._inflate(b"") if self._zlib is not None else []
        except zlib.error as exc:
            raise self._error(exc) from exc

    def _inflate(self, data: bytes) -> list[bytes]:
        assert self._zlib is not None
        pieces: list[bytes] = []
        while self.produced <= self.limit and not self._zlib.eof:
            room = min(self.limit + 1 - self.produced, _INFLATE_STEP)
            piece = self._zlib.decompress(data, room)
            self.produced += len(piece)
            pieces.append(piece)
            data = self._zlib.unconsumed_tail
            if not data and len(piece) < room:
                break  # all input used, and zlib stopped short of room: nothing pending
        return pieces

    def _error(self, exc: zlib.error) -> FeedFetchError:
        return FeedFetchError(
            f"bad response (body is not valid {self.coding}: {exc})",
            url=self.asked,
            status_code=self.status,
        )


def _decoder(headers: httpx.Headers, asked: str, status: int, limit: int) -> _BodyDecoder:
    """The decoder for the body's Content-Encoding; refuses stacked and unknown codings."""
    codings = [
        c.strip().lower()
        for c in headers.get_list("content-encoding", split_commas=True)
        if c.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return _BodyDecoder(None, limit, asked, status)
    if len(codings) > 1 or codings[0] not in _WBITS:
        kind = "stacked codings" if len(codings) > 1 else "an unsupported coding"
        raise FeedFetchError(
            f"Content-Encoding {', '.join(codings)!r} refused ({kind}; "
            f"accepted: {ACCEPT_ENCODING})",
            url=asked,
            status_code=status,
        )
    return _BodyDecoder(codings[0], limit, asked, status)
