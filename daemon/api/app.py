"""The HTTP API: a FastAPI app over a :class:`~daemon.api.facade.DaemonFacade`.

Routes (``docs/contracts.md``, "The HTTP API"; ``POST /v1/checkpoints`` serves
``editd checkpoint create``)::

    POST   /v1/edits            202 {"ids": [...], "results": [...]}
    GET    /v1/edits/{id}       200 the record
    GET    /v1/edits            200 {"edits": [...], "next_after": id | null}
    DELETE /v1/edits/{id}       200 the record after retraction
    POST   /v1/checkpoints      201 the checkpoint's registry record
    GET    /v1/status           200 queue depth, applied counts, last checkpoint, drift
    GET    /healthz             200 {"status": "ok"} | 503 {"status": "starting"|"unhealthy"}
    GET    /metrics             200 Prometheus text

The OpenAI-compatible routes (``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``) live in :mod:`daemon.api.openai_compat`; their errors have
OpenAI's shape.

Before any route runs, :class:`RequestGuard` checks, in this order: the ``Host``
header (a name this daemon serves, against DNS rebinding: 421), the ``Origin``
header (a browser's cross-origin request: 403), the bearer token when one is
configured (every route but ``/healthz``; reads, completions and chat as ``[api]
public_reads`` and ``completions_require_token`` say: 401), a JSON content type on
every POST (so that no web page can send one without a CORS preflight: 415), and
the body size (the ``Content-Length`` header and the bytes actually received: 413).
Every error is JSON (:mod:`daemon.api.errors`), in OpenAI's shape on its routes.

Endpoints that call the facade are plain functions, so FastAPI runs them in its
thread pool. ``/healthz`` and the dependencies are ``async``: they never wait for
the thread pool (or the engine lock). Completions run in the pool too (streamed
ones in a thread of their own), at most ``[api] max_concurrent_completions``
requests at once; more are refused with 429 and ``Retry-After`` instead of queueing.
The settings live in ``app.state`` and :func:`reload_settings` swaps in the
reloadable ones (SIGHUP: token rotation).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.api.deps import (
    CompletionSlots,
    Facade,
    Settings,
    documented_auth,
    require_ready,
)
from daemon.api.errors import ApiError, SafeJSONResponse, error_response, install_error_handlers
from daemon.api.facade import DaemonFacade
from daemon.api.models import EditsBody
from daemon.api.openai_compat import router as openai_router
from daemon.config import ApiConfig
from daemon.errors import EditNotFoundError
from store.schema import EditKind, EditStatus

log = structlog.get_logger()

READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/healthz"})
COMPLETIONS_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Routes that generate text: open without a token when ``completions_require_token`` is false."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
DEFAULT_PORTS: Mapping[str, int] = {"http": 80, "https": 443, "ws": 80, "wss": 443}
MAX_PAGE = 1000
DEFAULT_RETRACT_REASON = "retracted through the API"
RELOADABLE = (
    "token",
    "public_reads",
    "completions_require_token",
    "allowed_hosts",
    "max_request_bytes",
    "max_edits_per_request",
    "max_prompts_per_completion",
    "max_tokens_limit",
)
"""The ``[api]`` keys SIGHUP takes; the bind address, the connection limits and
``max_concurrent_completions`` need a restart."""


def create_app(facade: DaemonFacade, settings: ApiConfig) -> FastAPI:
    """The API app serving ``facade`` under the limits and token in ``settings``."""
    app = FastAPI(
        title="editd",
        summary="Knowledge-editing daemon: edit queue and completions from the edited model.",
        version="1",
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
    )
    app.state.facade = facade
    app.state.settings = settings
    app.state.completion_slots = CompletionSlots(settings.max_concurrent_completions)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=lambda: _settings_of(app))
    app.include_router(router)
    app.include_router(openai_router)
    return app


def reload_settings(app: FastAPI, fresh: ApiConfig) -> ApiConfig:
    """Take the :data:`RELOADABLE` keys of ``fresh`` (SIGHUP); the settings now in force.
    Requests that arrive afterwards see them, requests under way keep the old ones."""
    current = _settings_of(app)
    updated = replace(current, **{key: getattr(fresh, key) for key in RELOADABLE})
    app.state.settings = updated
    changed = [key for key in RELOADABLE if getattr(updated, key) != getattr(current, key)]
    log.info("api_settings_reloaded", changed=changed, token_set=bool(updated.token))
    return updated


def _settings_of(app: FastAPI) -> ApiConfig:
    settings: ApiConfig = app.state.settings
    return settings


class RequestGuard:
    """ASGI middleware: host, origin, token and content type, then the body-size limit
    (see the module doc for the order and the statuses).

    The settings are read per request (``settings()``), so a reload applies at once.
    The body is read here (at most ``max_request_bytes`` of it) and replayed to the
    app, so a body sent without ``Content-Length`` (chunked) is bounded as well.
    """

    def __init__(self, app: ASGIApp, *, settings: Callable[[], ApiConfig]) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        problem = check_request(scope, settings)
        if problem is not None:
            await problem(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body.extend(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if len(body) > settings.max_request_bytes:
                await _too_large(settings, str(scope.get("path")))(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def check_request(scope: Scope, settings: ApiConfig) -> SafeJSONResponse | None:
    """The error response for a request whose headers break a rule, else None."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    method, path = str(scope.get("method")), str(scope.get("path"))
    host = headers.get("host", "")
    hostname = _split_host(host)
    if hostname is None:
        return error_response(400, "a valid Host header is required", path=path)
    if not host_allowed(hostname[0], scope, settings):
        log.info("api_host_refused", host=host[:200], method=method, path=path)
        return error_response(
            421,
            f"host '{hostname[0][:200]}' is not served here (see [api] allowed_hosts)",
            path=path,
        )
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, hostname, str(scope.get("scheme"))):
        log.info("api_cross_origin_refused", origin=origin[:200], method=method, path=path)
        return error_response(403, "cross-origin requests are refused", path=path)
    if needs_token(method, path, settings) and not _token_matches(
        headers.get("authorization", ""), settings.token
    ):
        log.info("api_unauthorized", method=method, path=path)
        return error_response(
            401,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
            path=path,
        )
    if method == "POST":
        declared = headers.get("content-type")
        if not _is_json(declared):
            media = "none" if declared is None else f"'{_media_type(declared)[:100]}'"
            return error_response(
                415, f"content type must be application/json, got {media}", path=path
            )
    length = headers.get("content-length")
    if length is not None:
        try:
            size = int(length.strip())
        except ValueError:
            return error_response(400, "Content-Length is not an integer", path=path)
        if size > settings.max_request_bytes:
            return _too_large(settings, path)
    return None


def needs_token(method: str, path: str, settings: ApiConfig) -> bool:
    """Whether ``method path`` needs the bearer token under ``settings``."""
    if not settings.token or path in OPEN_PATHS:
        return False
    if method in READ_METHODS:
        return not settings.public_reads
    if method == "POST" and path in COMPLETIONS_PATHS:
        return settings.completions_require_token
    return True


def host_allowed(hostname: str, scope: Scope, settings: ApiConfig) -> bool:
    """Whether the ``Host`` header's name is one this daemon answers to: a loopback
    name, the bind address, the address the connection came in on, or ``allowed_hosts``.
    A name an attacker's DNS points at 127.0.0.1 (DNS rebinding) is none of these."""
    if "*" in settings.allowed_hosts:
        return True
    allowed = set(LOOPBACK_NAMES) | {name.lower() for name in settings.allowed_hosts}
    if settings.host not in WILDCARD_BINDS:
        allowed.add(settings.host.lower())
    server = scope.get("server")
    if server:
        allowed.add(str(server[0]).lower())
    return hostname in allowed


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``"Example.com:8765"`` -> ``("example.com", 8765)``, ``"[::1]"`` -> ``("::1", None)``;
    None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:  # a name, or a bare IPv6 address (not valid in Host, but unambiguous)
        name, port = value, ""
    name = name.rstrip(".")
    if not name or (port and not port.isdigit()):
        return None
    return name, int(port) if port else None


def _same_origin(origin: str, host: tuple[str, int | None], scheme: str) -> bool:
    """Whether ``Origin`` names the host and port the request was sent to."""
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False  # includes "null" (a sandboxed frame, a file: page)
    name, port = host
    own_port = port if port is not None else DEFAULT_PORTS.get(scheme, 80)
    if origin_port is None:
        origin_port = DEFAULT_PORTS[parts.scheme]
    return parts.hostname.rstrip(".") == name and origin_port == own_port


def _media_type(declared: str) -> str:
    return declared.split(";", 1)[0].strip().lower()


def _is_json(declared: str | None) -> bool:
    if declared is None:
        return False
    media = _media_type(declared)
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _too_large(settings: ApiConfig, path: str) -> SafeJSONResponse:
    return error_response(
        413, f"request body is larger than {settings.max_request_bytes} bytes", path=path
    )


def _token_matches(header: str, token: str) -> bool:
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(credentials.strip().encode("latin-1"), token.encode("latin-1"))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


router = APIRouter()


# --- edits -----------------------------------------------------------------------------


@router.post(
    "/v1/edits",
    status_code=202,
    dependencies=documented_auth,
    summary="Submit edit requests",
)
def submit_edits(body: EditsBody, facade: Facade, settings: Settings) -> dict[str, Any]:
    """Queue each request; invalid ones are stored as ``rejected`` with a reason."""
    if len(body.edits) > settings.max_edits_per_request:
        raise ApiError(
            413,
            f"at most {settings.max_edits_per_request} edits per request, got {len(body.edits)}",
            field="edits",
        )
    results = facade.submit(list(body.edits))
    return {"ids": [r.id for r in results], "results": [r.to_json_dict() for r in results]}


@router.get("/v1/edits/{edit_id}", dependencies=documented_auth, summary="One edit's record")
def get_edit(edit_id: Annotated[str, Path()], facade: Facade) -> dict[str, Any]:
    """Status, backend, batch, timings, verification result and error of one edit."""
    return facade.get_edit(edit_id).to_json_dict()


@router.get("/v1/edits", dependencies=documented_auth, summary="A page of edit records")
def list_edits(
    facade: Facade,
    status: Annotated[EditStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[str | None, Query(min_length=1)] = None,
    kind: Annotated[EditKind | None, Query()] = None,
) -> dict[str, Any]:
    """Records in queue order; pass ``next_after`` as ``after`` for the next page."""
    try:
        records = facade.list_edits(status, limit, after, kind)
    except EditNotFoundError as exc:
        raise ApiError(422, f"unknown edit id '{after}' in 'after'", field="after") from exc
    next_after = records[-1].id if records and len(records) >= limit else None
    return {"edits": [r.to_json_dict() for r in records], "next_after": next_after}


@router.delete(
    "/v1/edits/{edit_id}",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Retract (forget) an edit",
)
def retract_edit(
    edit_id: Annotated[str, Path()],
    facade: Facade,
    reason: Annotated[str, Query(min_length=1, max_length=1000)] = DEFAULT_RETRACT_REASON,
) -> dict[str, Any]:
    """Afterwards the model answers the edit's prompt as the base model did."""
    record = facade.retract(edit_id, reason)
    log.info("edit_retracted_by_api", edit_id=edit_id)
    return record.to_json_dict()


# --- completions, checkpoints, status ----------------------------------------------------


@router.post(
    "/v1/checkpoints",
    status_code=201,
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Write a checkpoint now",
)
def create_checkpoint(facade: Facade) -> dict[str, Any]:
    """Written between batches; returns the checkpoint registry record."""
    return facade.create_checkpoint()


@router.post(
    "/v1/checkpoints/{checkpoint_id}/restore",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Restore a checkpoint and replay later edits",
)
def restore_checkpoint(checkpoint_id: Annotated[str, Path()], facade: Facade) -> dict[str, Any]:
    """Loads the checkpoint (refused when it fails verification) and replays the store."""
    return facade.restore_checkpoint(checkpoint_id)


@router.post(
    "/v1/drift",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Run a drift check now",
)
def drift_check(facade: Facade) -> dict[str, Any]:
    """Probes vs the base model plus retention; a failing check rolls back and isolates."""
    return facade.run_drift_check()


@router.get("/v1/feeds", dependencies=documented_auth, summary="The feeds and their state")
def list_feeds(facade: Facade) -> dict[str, Any]:
    """Each feed: URL, status, last error, cache validators, next poll, item counts."""
    return {"feeds": facade.list_feeds()}


@router.post(
    "/v1/feeds/poll",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Poll feeds now",
)
def poll_feeds(
    facade: Facade, name: Annotated[str | None, Query(max_length=100)] = None
) -> dict[str, Any]:
    """Poll the feed ``name`` (due or not), or every feed that is due."""
    return {"polls": facade.poll_feeds(name)}


@router.post(
    "/v1/nightly",
    status_code=202,
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="Start the nightly run now",
)
def start_nightly(facade: Facade) -> dict[str, Any]:
    """Releases nightly edits and imports the spool in the background; then drift."""
    return facade.start_nightly("api")


@router.get(
    "/v1/status",
    dependencies=documented_auth,
    summary="Queue depth, applied counts, last checkpoint and drift",
)
def status(facade: Facade) -> dict[str, Any]:
    """The daemon's status document."""
    return facade.status()


@router.get("/healthz", summary="Readiness", response_model=None)
async def healthz(facade: Facade) -> SafeJSONResponse:
    """200 once the model is loaded and the worker runs; 503 before, and while the worker
    thread is dead or stuck. Runs on the event loop (``is_ready`` and ``worker_problem``
    only read flags): never behind the thread pool or the engine lock."""
    if not facade.is_ready():
        return SafeJSONResponse({"status": "starting"}, status_code=503)
    problem = facade.worker_problem()
    if problem is not None:
        return SafeJSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
    return SafeJSONResponse({"status": "ok"})


@router.get(
    "/metrics",
    dependencies=documented_auth,
    summary="Prometheus metrics",
    response_class=Response,
)
def metrics(facade: Facade) -> Response:
    """The Prometheus text exposition."""
    body, content_type = facade.metrics_text()
    return Response(content=body, media_type=content_type)
