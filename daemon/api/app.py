"""The HTTP API: a FastAPI app over a :class:`~daemon.api.facade.DaemonFacade`.

Routes (DESIGN.md, "The HTTP API"; ``POST /v1/checkpoints`` serves
``editd checkpoint create``)::

    POST   /v1/edits            202 {"ids": [...], "results": [...]}
    GET    /v1/edits/{id}       200 the record
    GET    /v1/edits            200 {"edits": [...], "next_after": id | null}
    DELETE /v1/edits/{id}       200 the record after retraction
    POST   /v1/completions      200 an OpenAI text_completion
    POST   /v1/checkpoints      201 the checkpoint's registry record
    GET    /v1/status           200 queue depth, applied counts, last checkpoint, drift
    GET    /healthz             200 {"status": "ok"} | 503 {"status": "starting"}
    GET    /metrics             200 Prometheus text

Before any route runs, :class:`RequestGuard` checks the bearer token of
mutating requests (every POST/PUT/PATCH/DELETE except ``/v1/completions``,
which only reads) when a token is configured, and the body size (the
``Content-Length`` header and the bytes actually received). Every error is
JSON (:mod:`daemon.api.errors`). Endpoints are plain functions, so FastAPI
runs the blocking facade calls in its thread pool.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.api.errors import ApiError, SafeJSONResponse, error_response, install_error_handlers
from daemon.api.facade import CompletionChoice, DaemonFacade
from daemon.api.models import CompletionBody, EditsBody
from daemon.config import ApiConfig
from daemon.errors import EditNotFoundError
from store.schema import EditStatus

log = structlog.get_logger()

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ONLY_POSTS = frozenset({"/v1/completions"})
MAX_PAGE = 1000
DEFAULT_RETRACT_REASON = "retracted through the API"

_bearer = HTTPBearer(auto_error=False, description="Required on mutating routes when set.")


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
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard, token=settings.token, max_request_bytes=settings.max_request_bytes
    )
    app.include_router(router)
    return app


class RequestGuard:
    """ASGI middleware: bearer token on mutating requests, then the body-size limit.

    The body is read here (at most ``max_request_bytes`` of it) and replayed to the
    app, so a body sent without ``Content-Length`` (chunked) is bounded as well.
    """

    def __init__(self, app: ASGIApp, *, token: str, max_request_bytes: int) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._check_headers(scope)
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
            if len(body) > self.max_request_bytes:
                await self._too_large()(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _check_headers(self, scope: Scope) -> SafeJSONResponse | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        authorization = headers.get("authorization", b"")
        if self.token and _needs_token(scope) and not _token_matches(authorization, self.token):
            log.info("api_unauthorized", method=scope.get("method"), path=scope.get("path"))
            return error_response(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length.decode("latin-1").strip())
            except ValueError:
                return error_response(400, "Content-Length is not an integer")
            if size > self.max_request_bytes:
                return self._too_large()
        return None

    def _too_large(self) -> SafeJSONResponse:
        return error_response(413, f"request body is larger than {self.max_request_bytes} bytes")


def _needs_token(scope: Scope) -> bool:
    return scope.get("method") in MUTATING_METHODS and scope.get("path") not in READ_ONLY_POSTS


def _token_matches(header: bytes, token: bytes) -> bool:
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return secrets.compare_digest(credentials.strip(), token)


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


# --- dependencies ----------------------------------------------------------------------


def get_facade(request: Request) -> DaemonFacade:
    """The facade the app was created with."""
    facade: DaemonFacade = request.app.state.facade
    return facade


def get_settings(request: Request) -> ApiConfig:
    """The API settings the app was created with."""
    settings: ApiConfig = request.app.state.settings
    return settings


def require_ready(facade: Annotated[DaemonFacade, Depends(get_facade)]) -> None:
    """503 until the model is loaded and the worker runs."""
    if not facade.is_ready():
        raise ApiError(503, "the daemon is starting", headers={"Retry-After": "1"})


async def require_json(request: Request) -> None:
    """415 for a body that is not declared as JSON (FastAPI would not parse it as JSON)."""
    declared = request.headers.get("content-type")
    if declared is None:
        if await request.body():
            raise ApiError(415, "content type must be application/json, got none")
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise ApiError(415, f"content type must be application/json, got '{media}'")


Facade = Annotated[DaemonFacade, Depends(get_facade)]
Settings = Annotated[ApiConfig, Depends(get_settings)]
_documented_auth = [Depends(_bearer)]

router = APIRouter()


# --- edits -----------------------------------------------------------------------------


@router.post(
    "/v1/edits",
    status_code=202,
    dependencies=[*_documented_auth, Depends(require_json)],
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


@router.get("/v1/edits/{edit_id}", summary="One edit's record")
def get_edit(edit_id: Annotated[str, Path()], facade: Facade) -> dict[str, Any]:
    """Status, backend, batch, timings, verification result and error of one edit."""
    return facade.get_edit(edit_id).to_json_dict()


@router.get("/v1/edits", summary="A page of edit records")
def list_edits(
    facade: Facade,
    status: Annotated[EditStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[str | None, Query(min_length=1)] = None,
) -> dict[str, Any]:
    """Records in queue order; pass ``next_after`` as ``after`` for the next page."""
    try:
        records = facade.list_edits(status, limit, after)
    except EditNotFoundError as exc:
        raise ApiError(422, f"unknown edit id '{after}' in 'after'", field="after") from exc
    next_after = records[-1].id if records and len(records) >= limit else None
    return {"edits": [r.to_json_dict() for r in records], "next_after": next_after}


@router.delete(
    "/v1/edits/{edit_id}",
    dependencies=[*_documented_auth, Depends(require_ready)],
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
    "/v1/completions",
    dependencies=[Depends(require_json), Depends(require_ready)],
    summary="OpenAI-style completions from the edited model",
)
def completions(body: CompletionBody, facade: Facade, settings: Settings) -> dict[str, Any]:
    """One choice per prompt; ``temperature`` 0 is greedy (the default is 1, as OpenAI's)."""
    prompts = body.prompts()
    if len(prompts) > settings.max_prompts_per_completion:
        raise ApiError(
            422,
            f"at most {settings.max_prompts_per_completion} prompts, got {len(prompts)}",
            field="prompt",
        )
    limit = settings.max_tokens_limit
    if body.max_tokens is not None and body.max_tokens > limit:
        raise ApiError(422, f"must be at most {limit}, got {body.max_tokens}", field="max_tokens")
    choices = facade.complete(body.to_request(limit))
    return _completion_json(body.model or "editd", choices, with_logprobs=body.logprobs is not None)


@router.post(
    "/v1/checkpoints",
    status_code=201,
    dependencies=[*_documented_auth, Depends(require_ready)],
    summary="Write a checkpoint now",
)
def create_checkpoint(facade: Facade) -> dict[str, Any]:
    """Written between batches; returns the checkpoint registry record."""
    return facade.create_checkpoint()


@router.post(
    "/v1/checkpoints/{checkpoint_id}/restore",
    dependencies=[*_documented_auth, Depends(require_ready)],
    summary="Restore a checkpoint and replay later edits",
)
def restore_checkpoint(checkpoint_id: Annotated[str, Path()], facade: Facade) -> dict[str, Any]:
    """Loads the checkpoint (refused when it fails verification) and replays the store."""
    return facade.restore_checkpoint(checkpoint_id)


@router.post(
    "/v1/drift",
    dependencies=[*_documented_auth, Depends(require_ready)],
    summary="Run a drift check now",
)
def drift_check(facade: Facade) -> dict[str, Any]:
    """Probes vs the base model plus retention; a failing check rolls back and isolates."""
    return facade.run_drift_check()


@router.get("/v1/feeds", summary="The feeds and their state")
def list_feeds(facade: Facade) -> dict[str, Any]:
    """Each feed: URL, status, last error, cache validators, next poll, item counts."""
    return {"feeds": facade.list_feeds()}


@router.post(
    "/v1/feeds/poll",
    dependencies=[*_documented_auth, Depends(require_ready)],
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
    dependencies=[*_documented_auth, Depends(require_ready)],
    summary="Start the nightly run now",
)
def start_nightly(facade: Facade) -> dict[str, Any]:
    """Releases nightly edits and imports the spool in the background; then drift."""
    return facade.start_nightly("api")


@router.get("/v1/status", summary="Queue depth, applied counts, last checkpoint and drift")
def status(facade: Facade) -> dict[str, Any]:
    """The daemon's status document."""
    return facade.status()


@router.get("/healthz", summary="Readiness", response_model=None)
def healthz(facade: Facade) -> SafeJSONResponse:
    """200 once the model is loaded and the worker runs, 503 before."""
    if facade.is_ready():
        return SafeJSONResponse({"status": "ok"})
    return SafeJSONResponse({"status": "starting"}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(facade: Facade) -> Response:
    """The Prometheus text exposition."""
    body, content_type = facade.metrics_text()
    return Response(content=body, media_type=content_type)


def _completion_json(
    model: str, choices: Sequence[CompletionChoice], *, with_logprobs: bool
) -> dict[str, Any]:
    prompt_tokens = sum(c.usage.get("prompt_tokens", 0) for c in choices)
    completion_tokens = sum(c.usage.get("completion_tokens", 0) for c in choices)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice_json(c, with_logprobs) for c in choices],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _choice_json(choice: CompletionChoice, with_logprobs: bool) -> dict[str, Any]:
    logprobs = None
    if with_logprobs:
        logprobs = {
            "tokens": list(choice.tokens),
            "token_logprobs": list(choice.token_logprobs),
            "top_logprobs": None if choice.top_logprobs is None else list(choice.top_logprobs),
            "text_offset": list(choice.text_offset),
        }
    return {
        "index": choice.index,
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "logprobs": logprobs,
    }
