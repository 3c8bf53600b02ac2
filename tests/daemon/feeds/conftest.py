"""A live HTTP feed server on 127.0.0.1 and a free port, for the fetch and poller tests.

The ``feed_server`` fixture yields a :class:`FeedServer` (a real
``http.server.ThreadingHTTPServer`` in a thread, shut down after the test)::

    from tests.daemon.feeds.conftest import FeedServer, Reply, SeenRequest

    def test_something(feed_server: FeedServer) -> None:
        feed_server.route("/feed", Reply(body=ATOM, content_type="application/atom+xml",
                                         etag='"v1"', last_modified=HTTP_DATE))
        feed_server.route("/flaky", Reply(503), Reply(503), Reply(200, body=b"{}"))  # in turn
        feed_server.route("/dyn", lambda req: Reply(body=req.path.encode()))         # computed
        feed_server.redirect("/old", "/feed", status=301)
        url = feed_server.url("/feed")                  # "http://127.0.0.1:PORT/feed"
        ...
        assert feed_server.count("/flaky") == 3
        assert feed_server.requests_to("/feed")[0].headers["if-none-match"] == '"v1"'

Routes (matched on the path without its query string; an unknown path gets 404):

- ``route(path, reply, ...)``: the replies are served in turn, the last one repeats;
- ``route(path, handler)``: ``handler(SeenRequest) -> Reply`` is called per request;
- ``redirect(path, to, status=301)``: a ``Location`` reply (``to`` may be a path or a URL).
  Calling ``route``/``redirect`` again replaces the path's route and restarts its turn.

A :class:`Reply` says: ``status``, ``body``, ``headers``, ``content_type``;
``delay_s`` (wait before answering; cut short at shutdown); ``etag`` and
``last_modified`` (sent with the reply; a request whose ``If-None-Match`` lists the
ETag, or, without ``If-None-Match``, whose ``If-Modified-Since`` equals
``last_modified``, gets 304 instead); ``framing``: ``"length"`` (a Content-Length,
default), ``"chunked"`` (Transfer-Encoding: chunked) or ``"close"`` (no length, the
body ends when the connection closes); ``content_length`` overrides the header
(lets a test lie); the body goes out in ``chunk_size`` pieces with
``chunk_delay_s`` between them (a trickling server).

The request log (``requests``, ``requests_to(path)``, ``count(path)``) holds
:class:`SeenRequest` objects: ``method``, ``path`` (with query) and ``headers``
(a dict with lower-case names). Every response says ``Connection: close``, so
each request is one connection. Errors raised inside the handler (other than the
client hanging up) land in ``errors``; the fixture fails the test if any did.

``tls_feed_server`` is the same over HTTPS, with a throw-away certificate for
``localhost`` and ``127.0.0.1`` (made with the ``openssl`` command; the tests that
use it are skipped without one); ``tls_client_context`` is an ``ssl.SSLContext``
that trusts it (``httpx.Client(verify=tls_client_context)``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest


@dataclass(frozen=True)
class Reply:
    """One programmed response; see the module docstring."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    delay_s: float = 0.0
    etag: str | None = None
    last_modified: str | None = None
    framing: Literal["length", "chunked", "close"] = "length"
    content_length: int | None = None
    chunk_size: int = 1024
    chunk_delay_s: float = 0.0


@dataclass(frozen=True)
class SeenRequest:
    """One request the server received; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[[SeenRequest], Reply]
_HANGUPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


class _Route:
    def __init__(self, replies: tuple[Reply, ...] = (), handler: Handler | None = None) -> None:
        self.replies = replies
        self.handler = handler
        self.turn = 0

    def take(self) -> Reply:
        reply = self.replies[min(self.turn, len(self.replies) - 1)]
        self.turn += 1
        return reply


class FeedServer:
    """A programmable HTTP server for feed tests; see the module docstring for its API."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.scheme = "http" if tls is None else "https"
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._requests: list[SeenRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._httpd = _Server(self, tls)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    # --- programming -----------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` on this server."""
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def route(self, path: str, *replies: Reply | Handler) -> None:
        """Serve ``replies`` in turn at ``path`` (the last repeats), or call one handler."""
        if len(replies) == 1 and callable(replies[0]):
            new = _Route(handler=replies[0])
        elif replies and all(isinstance(r, Reply) for r in replies):
            new = _Route(replies=tuple(r for r in replies if isinstance(r, Reply)))
        else:
            raise TypeError("route() takes one handler or one or more Reply objects")
        with self._lock:
            self._routes[path] = new

    def redirect(self, path: str, to: str, *, status: int = 301) -> None:
        """Answer ``path`` with a redirect to ``to`` (a path on this server or a full URL)."""
        self.route(path, Reply(status, headers={"Location": to}))

    # --- the request log -------------------------------------------------------------

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[SeenRequest]:
        """The requests whose path (without query) is ``path``."""
        return [r for r in self.requests if urlsplit(r.path).path == path]

    def count(self, path: str) -> int:
        """How many requests ``path`` received."""
        return len(self.requests_to(path))

    # --- serving ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, cut short any delays and join every thread."""
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _reply_for(self, request: SeenRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
            route = self._routes.get(urlsplit(request.path).path)
            if route is None:
                return Reply(404, body=b"not found")
            if route.handler is None:
                return route.take()
            handler = route.handler
        return handler(request)  # outside the lock: a handler may read the request log

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        request = SeenRequest(h.command, h.path, headers)
        reply = self._reply_for(request)
        h.close_connection = True
        if reply.delay_s and self.stopping.wait(reply.delay_s):
            return
        # the client may hang up (timeout, size limit): expected in these tests
        with contextlib.suppress(*_HANGUPS):
            _write(h, reply, _not_modified(reply, headers), self.stopping)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck handler cannot keep the test process alive

    def __init__(self, owner: FeedServer, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _RequestHandler)
        if tls is not None:  # the handshake happens in the handler thread, on first read
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, _HANGUPS):
            self.owner.errors.append(exc)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5.0  # an idle client cannot hold a handler thread past this
    server: _Server

    def do_GET(self) -> None:
        self.server.owner.serve(self)

    def do_HEAD(self) -> None:
        self.server.owner.serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the request log is the record


def _not_modified(reply: Reply, headers: dict[str, str]) -> bool:
    if reply.status != 200:
        return False
    if "if-none-match" in headers:
        sent = {tag.strip() for tag in headers["if-none-match"].split(",")}
        return reply.etag is not None and (reply.etag in sent or "*" in sent)
    return reply.last_modified is not None and headers.get("if-modified-since") == (
        reply.last_modified
    )


def _write(
    h: BaseHTTPRequestHandler, reply: Reply, not_modified: bool, stopping: threading.Event
) -> None:
    status = 304 if not_modified else reply.status
    body = b"" if not_modified or h.command == "HEAD" else reply.body
    h.send_response(status)
    for name, value in reply.headers.items():
        h.send_header(name, value)
    if reply.content_type is not None and not not_modified:
        h.send_header("Content-Type", reply.content_type)
    if reply.etag is not None:
        h.send_header("ETag", reply.etag)
    if reply.last_modified is not None:
        h.send_header("Last-Modified", reply.last_modified)
    h.send_header("Connection", "close")
    if status == 304 or status < 200:
        h.end_headers()
        return
    if reply.framing == "chunked":
        h.send_header("Transfer-Encoding", "chunked")
    elif reply.framing == "length" or reply.content_length is not None:
        length = reply.content_length if reply.content_length is not None else len(body)
        h.send_header("Content-Length", str(length))
    h.end_headers()
    step = max(1, reply.chunk_size)
    for start in range(0, len(body), step):
        if start and reply.chunk_delay_s and stopping.wait(reply.chunk_delay_s):
            return
        chunk = body[start : start + step]
        if reply.framing == "chunked":
            chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        h.wfile.write(chunk)
    if reply.framing == "chunked":
        h.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    """A live :class:`FeedServer`; it fails the test if its handler raised."""
    server = FeedServer()
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, f"feed server handler raised: {server.errors!r}"


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost and 127.0.0.1 (PEM files)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_client_context(tls_certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts :func:`tls_certificate` (and nothing else)."""
    return ssl.create_default_context(cafile=str(tls_certificate[0]))


@pytest.fixture
def tls_feed_server(tls_certificate: tuple[Path, Path]) -> Iterator[FeedServer]:
    """A live :class:`FeedServer` over HTTPS (``url()`` gives ``https://127.0.0.1:PORT``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_certificate)
    server = FeedServer(tls=context)
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, f"feed server handler raised: {server.errors!r}"
