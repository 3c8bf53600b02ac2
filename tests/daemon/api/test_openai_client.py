"""The OpenAI-compatible routes through OpenAI's own Python client, against a live server.

The facade is the real one of ``conftest`` (micro world model, fresh store, a real
engine lock); chat renders with ``CHAT_TEMPLATE``. Greedy decoding (temperature 0)
makes a streamed answer comparable with a whole one.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from contextlib import closing
from typing import Any

import openai
import pytest
from structlog.testing import capture_logs

from daemon.api.deps import CompletionSlots
from daemon.engine.completions import CompletionDelta, CompletionRequest
from tests.daemon.api.conftest import (
    CHAT_TEMPLATE,
    MODEL_NAME,
    TOKEN,
    LiveServer,
    ServerFactory,
    StoreFacade,
    wait_until,
)

PROMPT = "The capital of Vonmark is"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Shus Fismou works for"},
]


def client_for(server: LiveServer, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture
def server(make_server: ServerFactory) -> LiveServer:
    return make_server(max_tokens_limit=16)


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with client_for(server) as c:
        yield c


# --- models ----------------------------------------------------------------------------------


def test_models_list_the_served_model_with_the_edit_watermark(
    client: openai.OpenAI, facade: StoreFacade
) -> None:
    facade.queue.submit({"prompt": "The CEO of Acme is", "target": " Jane"})
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (MODEL_NAME, "model", "editd")
    extra = model.model_extra or {}
    assert extra["editd"]["applied_edits"] == 0
    assert set(extra["editd"]) >= {"applied_by_backend", "watermark", "name_or_path"}
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_served_model_name_is_configurable(make_server: ServerFactory) -> None:
    with client_for(make_server(served_model_name="acme-editd")) as c:
        assert [m.id for m in c.models.list().data] == ["acme-editd"]
        reply = c.completions.create(model="acme-editd", prompt=PROMPT, max_tokens=2)
        assert reply.model == "acme-editd"
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)


# --- completions -----------------------------------------------------------------------------


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    """Greedy: the streamed text is the non-streamed text; include_usage ends the stream
    with a chunk of empty choices and the same usage."""
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert len([t for t in texts if t]) >= 2  # it did stream
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_without_usage_and_with_logprobs(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stream=True
        )
    )
    assert all(c.usage is None and c.choices for c in chunks)
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens
    offsets = [o for c in chunks for o in (c.choices[0].logprobs.text_offset or [])]  # type: ignore[union-attr]
    assert offsets == whole.choices[0].logprobs.text_offset


# --- chat ------------------------------------------------------------------------------------


def test_chat_renders_the_template_and_answers_through_the_completion_path(
    client: openai.OpenAI, facade: StoreFacade
) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=8, temperature=0
    )
    (choice,) = reply.choices
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    rendered = "system: Answer briefly.\nuser: Shus Fismou works for\nassistant:"
    assert facade.routing.calls[-1] == (rendered,)  # editors route on the rendered prompt
    expected = client.completions.create(
        model=MODEL_NAME, prompt=rendered, max_tokens=8, temperature=0
    )
    assert choice.message.content == expected.choices[0].text
    assert reply.usage is not None and reply.usage == expected.usage


def test_streamed_chat_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_logprobs_streamed_and_whole(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**kwargs)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == whole.choices[0].message.content
    for entry in logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode("utf-8"))
    streamed = [
        t.token
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        for t in c.choices[0].logprobs.content
    ]
    assert streamed == [t.token for t in logprobs.content]


def test_chat_without_a_template_is_a_400(client: openai.OpenAI, facade: StoreFacade) -> None:
    facade.chat_template = None  # the micro world's tokenizer has none of its own
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert "chat_template" in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_the_models_own_template_is_used(client: openai.OpenAI, facade: StoreFacade) -> None:
    facade.chat_template = None
    tokenizer = facade.world.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant:", "bot:")
    try:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES[1:], max_tokens=1)
    finally:
        tokenizer.chat_template = None
    assert facade.routing.calls[-1] == ("user: Shus Fismou works for\nbot:",)


# --- errors ----------------------------------------------------------------------------------


def test_errors_surface_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=1)
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert missing.value.type == "invalid_request_error"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"max_tokens": 17}, "max_tokens"),
        ({"max_completion_tokens": 17}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"temperature": 3}, "temperature"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **extra)
        assert caught.value.status_code == 400
        assert (caught.value.param, caught.value.type) == (param, "invalid_request_error")
    tool_turn: list[Any] = [{"role": "tool", "content": "x", "tool_call_id": "1"}]
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model=MODEL_NAME, messages=tool_turn, max_tokens=1)
    assert role.value.param is not None and role.value.param.startswith("messages.0")


def test_a_wrong_key_is_an_authentication_error(make_server: ServerFactory) -> None:
    server = make_server(token=TOKEN)
    with client_for(server, api_key="not-the-token") as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    with client_for(server, api_key=TOKEN) as right:
        assert right.models.list().data[0].id == MODEL_NAME


# --- a client that goes away -----------------------------------------------------------------


class HeldStreamFacade(StoreFacade):
    """A real facade whose streams pause after each token until ``gate`` opens, so a
    test can close its connection while the engine lock is held mid-generation."""

    def __init__(self, base: StoreFacade) -> None:
        super().__init__(base.store, base.world)
        self.gate = threading.Event()
        self.closed_early = False

    def stream(self, request: CompletionRequest) -> Generator[CompletionDelta, None, None]:
        return self._held(super().stream(request))

    def _held(
        self, deltas: Generator[CompletionDelta, None, None]
    ) -> Generator[CompletionDelta, None, None]:
        try:
            with closing(deltas):
                for delta in deltas:
                    yield delta
                    self.gate.wait(timeout=60)
        except GeneratorExit:
            self.closed_early = True
            raise


def test_a_closed_stream_frees_the_engine(make_server: ServerFactory, facade: StoreFacade) -> None:
    held = HeldStreamFacade(facade)
    server = make_server(held, max_concurrent_completions=1, max_tokens_limit=64)
    slots: CompletionSlots = server.app.state.completion_slots
    with client_for(server) as client, capture_logs() as events:
        chunks = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=64, temperature=0, stream=True
        )
        first = next(iter(chunks))
        assert first.choices[0].delta.role == "assistant"
        assert held.lock.held() and slots.busy == 1  # generating, under the engine lock
        chunks.close()
        wait_until(
            lambda: any(e["event"].startswith("completion_stream_client") for e in events),
            what="the server to see the client go",
        )
    held.gate.set()  # the next token: the stream must stop there
    wait_until(lambda: not held.lock.held() and slots.busy == 0, what="the engine to be freed")
    assert held.closed_early
    with client_for(server) as client:
        again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert again.choices[0].text
