"""Request bodies of the HTTP API (pydantic models; they also make the OpenAPI document).

Edit requests are passed through as decoded JSON values: the store's validation
is the single source of rules for them, and an invalid one is stored as
``rejected`` with its reason. Completion and chat requests are validated here;
limits that depend on the configuration (prompt count, ``max_tokens``) and the
``model`` name are checked by the route.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from daemon.engine.completions import CompletionRequest

MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16


def _encodable(text: str) -> str:
    """Reject text that cannot be UTF-8 encoded (lone surrogates from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from exc
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class EditsBody(BaseModel):
    """``POST /v1/edits``: a list of edit requests (``docs/contracts.md``, "The edit request")."""

    model_config = ConfigDict(extra="forbid")

    edits: list[JsonValue] = Field(
        description="Edit requests as JSON objects; invalid ones are stored as rejected."
    )


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(
        default=False, description="End the stream with a chunk holding only the usage."
    )


class _Sampling(BaseModel):
    """The keys that completions and chat share."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(
        default=None, description="The served model's id (GET /v1/models); may be left out."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus mass when sampling.")
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        default=None, description="Up to 4 strings; the text is cut before the first one."
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seed for sampling.")
    n: Literal[1] = Field(default=1, description="Only 1 is supported.")
    stream: bool = Field(default=False, description="Send server-sent events, token by token.")
    stream_options: StreamOptions | None = Field(
        default=None, description="Only with stream: true."
    )
    user: str | None = Field(default=None, description="Accepted and ignored.")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_Sampling):
    """``POST /v1/completions``: the OpenAI completions subset editd serves."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="One prompt, or a list of prompts (one choice each)."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        description=f"New tokens per prompt, at most (default {DEFAULT_MAX_TOKENS}, or the "
        "server's limit when that is lower).",
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (0..5)."
    )
    echo: Literal[False] = Field(default=False, description="Only false is supported.")

    def prompts(self) -> tuple[str, ...]:
        """The prompts as a tuple (a single string is one prompt)."""
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    def max_new_tokens(self, limit: int) -> int:
        """``max_tokens``, or the default capped at the server's ``limit`` when omitted."""
        return _max_new_tokens(self.max_tokens, limit)

    def to_request(self, limit: int) -> CompletionRequest:
        """The facade's :class:`CompletionRequest` (the route checks ``max_tokens <= limit``)."""
        return CompletionRequest(
            prompts=self.prompts(),
            max_tokens=self.max_new_tokens(limit),
            temperature=self.temperature,
            top_p=self.top_p,
            logprobs=self.logprobs,
            stop=self.stops(),
            seed=self.seed,
        )


class TextPart(BaseModel):
    """A text part of a message's content (other kinds of parts are not served)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One message of a conversation. ``developer`` is rendered as ``system``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Accepted and ignored.")

    def as_template_input(self) -> dict[str, str]:
        """``{"role", "content"}`` as chat templates take it (parts joined)."""
        text = self.content if isinstance(self.content, str) else _joined(self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Sampling):
    """``POST /v1/chat/completions``: the OpenAI chat subset editd serves."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The conversation, rendered with the model's chat template."
    )
    max_tokens: int | None = Field(
        default=None, ge=0, description="New tokens at most (max_completion_tokens wins)."
    )
    max_completion_tokens: int | None = Field(
        default=None,
        ge=0,
        description=f"New tokens at most (default {DEFAULT_MAX_TOKENS}, or the server's limit "
        "when that is lower).",
    )
    logprobs: bool = Field(default=False, description="Log-probabilities of the reply's tokens.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Alternatives per token (0..20); needs logprobs: true.",
    )

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens`` (None: neither given)."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_input() for m in self.messages]

    def to_request(self, prompt: str, limit: int) -> CompletionRequest:
        """The facade's request for the rendered ``prompt`` (the route checks the limit)."""
        return CompletionRequest(
            prompts=(prompt,),
            max_tokens=_max_new_tokens(self.requested_tokens(), limit),
            temperature=self.temperature,
            top_p=self.top_p,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            stop=self.stops(),
            seed=self.seed,
        )


def _max_new_tokens(requested: int | None, limit: int) -> int:
    return min(DEFAULT_MAX_TOKENS, limit) if requested is None else requested


def _joined(parts: Sequence[TextPart]) -> str:
    return "".join(part.text for part in parts)
