"""Request bodies of the HTTP API (pydantic models; they also make the OpenAPI document).

Edit requests are passed through as decoded JSON values: the store's validation
is the single source of rules for them, and an invalid one is stored as
``rejected`` with its reason. Completion requests are validated here; limits
that depend on the configuration (prompt count, ``max_tokens``) are checked by
the route.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from daemon.engine.completions import CompletionRequest

MAX_LOGPROBS = 5
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


class CompletionBody(BaseModel):
    """``POST /v1/completions``: the OpenAI completions subset editd serves."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(default=None, description="Accepted and ignored.")
    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="One prompt, or a list of prompts (one choice each)."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        description=f"New tokens per prompt, at most (default {DEFAULT_MAX_TOKENS}, or the "
        "server's limit when that is lower).",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus mass when sampling.")
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (0..5)."
    )
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        default=None, description="Up to 4 strings; the text is cut before the first one."
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seed for sampling.")
    n: Literal[1] = Field(default=1, description="Only 1 is supported.")
    echo: Literal[False] = Field(default=False, description="Only false is supported.")
    stream: Literal[False] = Field(default=False, description="Only false is supported.")
    user: str | None = Field(default=None, description="Accepted and ignored.")

    def prompts(self) -> tuple[str, ...]:
        """The prompts as a tuple (a single string is one prompt)."""
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    def max_new_tokens(self, limit: int) -> int:
        """``max_tokens``, or the default capped at the server's ``limit`` when omitted."""
        return min(DEFAULT_MAX_TOKENS, limit) if self.max_tokens is None else self.max_tokens

    def to_request(self, limit: int) -> CompletionRequest:
        """The facade's :class:`CompletionRequest` (the route checks ``max_tokens <= limit``)."""
        stop: tuple[str, ...]
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        else:
            stop = tuple(self.stop)
        return CompletionRequest(
            prompts=self.prompts(),
            max_tokens=self.max_new_tokens(limit),
            temperature=self.temperature,
            top_p=self.top_p,
            logprobs=self.logprobs,
            stop=stop,
            seed=self.seed,
        )
