"""The OpenAI-compatible routes, from the edited model::

    POST /v1/completions        200 an OpenAI text_completion (or its chunks as events)
    POST /v1/chat/completions   200 an OpenAI chat.completion (or chat.completion.chunk events)
    GET  /v1/models             200 {"object": "list", "data": [the served model]}
    GET  /v1/models/{id}        200 the served model; 404 model_not_found for another id

The served model's id is ``[api] served_model_name``, else the name of ``[model]
name_or_path`` (:func:`served_model_id`); a request naming another ``model`` gets 404
``model_not_found`` (leaving ``model`` out is fine). Its ``editd`` member tells how far
edits have come: ``applied_edits``, ``applied_by_backend`` and ``watermark`` (the edit
log's newest event id).

Chat messages are rendered with the model's chat template (or ``[api]
chat_template``) into one prompt, which then goes through the same completion path as
``/v1/completions``: editors route on the rendered prompt. With ``stream: true`` the
answer comes as server-sent events, one per token that adds text, then
``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with empty
``choices`` and the usage. Generation runs in a thread of its own
(:mod:`daemon.api.streaming`) and stops at the next token when the client goes away.

At most ``[api] max_concurrent_completions`` generating requests run at once, streamed
or not; another is refused with 429 and ``Retry-After``. Errors have OpenAI's shape
(:mod:`daemon.api.errors`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from daemon.api.deps import (
    RETRY_AFTER_S,
    CompletionSlots,
    Facade,
    Settings,
    Slots,
    documented_auth,
    require_ready,
)
from daemon.api.errors import ApiError, openai_error
from daemon.api.facade import DaemonFacade
from daemon.api.models import ChatBody, CompletionBody
from daemon.api.streaming import (
    DONE_EVENT,
    EventStreamResponse,
    ThreadedStream,
    sse_event,
)
from daemon.config import ApiConfig
from daemon.engine.completions import (
    CompletionChoice,
    CompletionDelta,
    CompletionRequest,
    TokenLogprob,
)

log = structlog.get_logger()

OWNER = "editd"

router = APIRouter()


# --- models --------------------------------------------------------------------------------


def served_model_id(settings: ApiConfig, name_or_path: str) -> str:
    """The id clients name the model by: ``[api] served_model_name``, else the folder's or
    file's own name when ``name_or_path`` is one, else ``name_or_path`` itself."""
    if settings.served_model_name:
        return settings.served_model_name
    path = Path(name_or_path)
    return path.name if path.name and path.exists() else name_or_path


def check_model(requested: str | None, facade: DaemonFacade, settings: ApiConfig) -> str:
    """The served model's id; 404 ``model_not_found`` when ``requested`` names another."""
    served = served_model_id(settings, facade.model_name())
    if requested is not None and requested != served:
        raise ApiError(
            404,
            f"the model '{requested[:200]}' does not exist; this server serves '{served}'",
            field="model",
            code="model_not_found",
        )
    return served


@router.get("/v1/models", dependencies=documented_auth, summary="The served model")
def list_models(facade: Facade, settings: Settings) -> dict[str, Any]:
    """An OpenAI ``list`` holding the one model editd serves."""
    return {"object": "list", "data": [_model_json(facade, settings)]}


@router.get("/v1/models/{model_id:path}", dependencies=documented_auth, summary="One model")
def get_model(model_id: str, facade: Facade, settings: Settings) -> dict[str, Any]:
    """The served model; 404 ``model_not_found`` for any other id."""
    check_model(model_id, facade, settings)
    return _model_json(facade, settings)


def _model_json(facade: DaemonFacade, settings: ApiConfig) -> dict[str, Any]:
    info = facade.model_info()
    loaded_at = info.get("loaded_at")
    return {
        "id": served_model_id(settings, str(info["name_or_path"])),
        "object": "model",
        "created": int(loaded_at) if isinstance(loaded_at, int | float) else 0,
        "owned_by": OWNER,
        "editd": {
            "name_or_path": info["name_or_path"],
            "applied_edits": info["applied_edits"],
            "applied_by_backend": info["applied_by_backend"],
            "watermark": info["watermark"],
        },
    }


# --- completions ---------------------------------------------------------------------------


@router.post(
    "/v1/completions",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="OpenAI-style completions from the edited model",
    response_model=None,
)
async def completions(
    body: CompletionBody, facade: Facade, settings: Settings, slots: Slots
) -> dict[str, Any] | Response:
    """One choice per prompt; ``temperature`` 0 is greedy (the default is 1, as OpenAI's).
    Each prompt sees one state of the model; an edit batch that is waiting goes between
    two prompts of a request."""
    model = check_model(body.model, facade, settings)
    prompts = body.prompts()
    if len(prompts) > settings.max_prompts_per_completion:
        raise ApiError(
            400,
            f"at most {settings.max_prompts_per_completion} prompts, got {len(prompts)}",
            field="prompt",
        )
    _check_stream_options(body.stream, body.stream_options is not None)
    _check_max_tokens(body.max_tokens, settings, "max_tokens")
    request = body.to_request(settings.max_tokens_limit)
    shape = _Shape(
        object="text_completion",
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        with_logprobs=body.logprobs is not None,
        prompts=prompts,
    )
    return await _respond(facade, request, slots, shape, body, _completion_choice)


@router.post(
    "/v1/chat/completions",
    dependencies=[*documented_auth, Depends(require_ready)],
    summary="OpenAI-style chat completions from the edited model",
    response_model=None,
)
async def chat_completions(
    body: ChatBody, facade: Facade, settings: Settings, slots: Slots
) -> dict[str, Any] | Response:
    """The messages rendered with the chat template, answered by the completion path
    (greedy at ``temperature`` 0). 400 for a model without a chat template unless
    ``[api] chat_template`` names one."""
    model = check_model(body.model, facade, settings)
    _check_stream_options(body.stream, body.stream_options is not None)
    _check_max_tokens(body.max_tokens, settings, "max_tokens")
    _check_max_tokens(body.max_completion_tokens, settings, "max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", field="top_logprobs")
    prompt = await run_in_threadpool(facade.render_chat, body.template_messages())
    request = body.to_request(prompt, settings.max_tokens_limit)
    shape = _Shape(
        object="chat.completion",
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        with_logprobs=body.logprobs,
        prompts=(prompt,),
    )
    return await _respond(facade, request, slots, shape, body, _chat_choice)


async def _respond(
    facade: DaemonFacade,
    request: CompletionRequest,
    slots: CompletionSlots,
    shape: _Shape,
    body: CompletionBody | ChatBody,
    choice: Callable[[CompletionChoice, bool], dict[str, Any]],
) -> dict[str, Any] | Response:
    """Take a completion slot and answer: server-sent events when ``body.stream``, else
    one object of ``shape`` with a ``choice`` per prompt (the slot is given back)."""
    _take(slots)
    if body.stream:
        return _stream(facade, request, slots, shape, include_usage=body.include_usage())
    try:
        choices = await run_in_threadpool(facade.complete, request)
    finally:
        slots.give_back()
    return {
        **shape.head(),
        "choices": [choice(c, shape.with_logprobs) for c in choices],
        "usage": _usage(choices),
    }


def _check_stream_options(stream: bool, given: bool) -> None:
    if given and not stream:
        raise ApiError(400, "stream_options needs stream: true", field="stream_options")


def _check_max_tokens(value: int | None, settings: ApiConfig, field: str) -> None:
    limit = settings.max_tokens_limit
    if value is not None and value > limit:
        raise ApiError(400, f"must be at most {limit}, got {value}", field=field)


def _take(slots: CompletionSlots) -> None:
    if not slots.take():
        log.debug("completion_refused_busy", running=slots.busy, limit=slots.limit)
        raise ApiError(
            429,
            f"{slots.limit} completion requests are running already; retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )


# --- response shapes -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What every object or chunk of one response repeats, and how its choices look."""

    object: str  # "text_completion" | "chat.completion"
    id: str
    created: int
    model: str
    with_logprobs: bool
    prompts: tuple[str, ...]

    @property
    def chat(self) -> bool:
        return self.object == "chat.completion"

    def head(self, *, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk and self.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _usage(choices: Sequence[CompletionChoice]) -> dict[str, int]:
    prompt = sum(c.usage.get("prompt_tokens", 0) for c in choices)
    completion = sum(c.usage.get("completion_tokens", 0) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_choice(choice: CompletionChoice, with_logprobs: bool) -> dict[str, Any]:
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


def _chat_choice(choice: CompletionChoice, with_logprobs: bool) -> dict[str, Any]:
    logprobs = None
    if with_logprobs:
        tops = choice.top_logprobs or tuple({} for _ in choice.tokens)
        logprobs = {
            "content": [
                _chat_token(token, logprob, tuple(top.items()))
                for token, logprob, top in zip(
                    choice.tokens, choice.token_logprobs, tops, strict=True
                )
            ]
        }
    return {
        "index": choice.index,
        "message": {"role": "assistant", "content": choice.text},
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


def _chat_token(token: str, logprob: float, top: Sequence[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8", "replace")),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}
            for t, lp in top
        ],
    }


# --- streaming -----------------------------------------------------------------------------


def _stream(
    facade: DaemonFacade,
    request: CompletionRequest,
    slots: CompletionSlots,
    shape: _Shape,
    *,
    include_usage: bool,
) -> Response:
    """Start generating in a thread (the slot goes back when it ends); the events."""
    stream: ThreadedStream[CompletionDelta] = ThreadedStream(
        lambda: facade.stream(request), on_exit=slots.give_back
    )
    try:
        stream.start()
    except BaseException:
        slots.give_back()
        raise
    return EventStreamResponse(_events(stream, shape, include_usage=include_usage), stream)


async def _events(
    stream: ThreadedStream[CompletionDelta], shape: _Shape, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The chunks of one response as server-sent events, then ``[DONE]``. A failure
    half-way is sent as an OpenAI error event (the stream then ends without ``[DONE]``)."""
    usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    started: set[int] = set()
    try:
        async for delta in stream.items():
            if shape.chat and delta.index not in started:
                started.add(delta.index)
                role = {"index": delta.index, "delta": {"role": "assistant", "content": ""}}
                yield _chunk(shape, [{**role, "logprobs": None, "finish_reason": None}], extra)
            if delta.usage is not None:
                for key in usage:
                    usage[key] += delta.usage.get(key, 0)
            last = delta.finish_reason is not None
            if delta.text or delta.logprobs or (last and not shape.chat):
                yield _chunk(shape, [_delta_choice(shape, delta)], extra)
            if shape.chat and delta.finish_reason is not None:
                end = {"index": delta.index, "delta": {}, "logprobs": None}
                yield _chunk(shape, [{**end, "finish_reason": delta.finish_reason}], extra)
    except Exception as exc:
        log.error("completion_stream_failed", error=type(exc).__name__, exc_info=exc)
        yield sse_event(_json(openai_error(500, "internal error during generation")))
        return
    if stream.cancelled:
        return
    if include_usage:
        total = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        yield _chunk(shape, [], {"usage": total})
    yield DONE_EVENT


def _delta_choice(shape: _Shape, delta: CompletionDelta) -> dict[str, Any]:
    """One choice of a chunk: chat's ``delta`` (its finish comes in a chunk of its own),
    or a completion's ``text`` with its finish reason."""
    if shape.chat:
        logprobs = None
        if shape.with_logprobs:
            logprobs = {"content": [_chat_token(e.token, e.logprob, e.top) for e in delta.logprobs]}
        return {
            "index": delta.index,
            "delta": {"content": delta.text},
            "logprobs": logprobs,
            "finish_reason": None,
        }
    return {
        "index": delta.index,
        "text": delta.text,
        "finish_reason": delta.finish_reason,
        "logprobs": _legacy_logprobs(shape, delta.index, delta.logprobs)
        if shape.with_logprobs
        else None,
    }


def _legacy_logprobs(shape: _Shape, index: int, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    shift = len(shape.prompts[index])
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": [shift + e.offset for e in entries],
    }


def _chunk(shape: _Shape, choices: list[dict[str, Any]], extra: dict[str, Any]) -> bytes:
    return sse_event(_json({**shape.head(chunk=True), "choices": choices, **extra}))


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode(
        "ascii"
    )
