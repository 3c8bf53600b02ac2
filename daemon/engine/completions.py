"""OpenAI-style text completions from a Hugging Face causal LM, one prompt at a time,
token by token.

:func:`stream` yields a :class:`CompletionDelta` after every generated token (its
text may be empty while text is held back, see below) and a last one per prompt
with the finish reason and the usage; :func:`complete` joins those deltas into
:class:`CompletionChoice` objects, so a streamed answer and a whole one are the
same text. A consumer that stops iterating (``close()`` on the generator) stops
generation at the next token.

Each prompt is generated alone, with its own key/value cache, inside
``routing([prompt])``: editors that route per batch row (MELO) see exactly the
prompt whose rows they serve, and an unpadded single row needs no attention
mask or position ids (the greedy result equals
:func:`daemon.model.generate.greedy_continuations`). All the work on one prompt
(tokenising, eval mode, generation, decoding) lies inside one ``turn()``: the
daemon's engine takes its lock per prompt there, so a waiting edit batch can go
between two prompts of a request. The turn is a context held across ``yield``:
iterate :func:`stream` in one thread (the engine lock belongs to a thread).

- ``temperature == 0``: greedy (argmax). Otherwise the logits are divided by the
  temperature, cut to the nucleus of mass ``top_p`` and sampled with a
  ``torch.Generator`` seeded by ``seed`` (one generator for the whole request, so
  a seeded request is reproducible).
- Finish reasons: ``"stop"`` for eos (not part of the text) or a stop string (the
  text is cut before the first one), else ``"length"``.
- Text is handed out as soon as it cannot change any more: the decoded text of
  all tokens so far, less a trailing incomplete character (U+FFFD), trailing
  whitespace (a tokenizer's clean-up may drop a space before punctuation) and a
  tail that could be the start of a stop string. The rest follows with the next
  token or the last delta.
- ``logprobs=k``: for every kept token its string, its log-probability under the
  model's own distribution (``log_softmax`` of the logits, temperature 1), the
  ``k`` most likely alternatives and its ``text_offset``: the character offset in
  ``prompt + text``, so the first token's offset is ``len(prompt)`` (OpenAI's
  legacy format). A token is kept when it starts before the cut of a stop string;
  a delta carries the tokens that start inside the text handed out so far.
- A prompt that does not fit the model's context together with ``max_tokens`` is
  cut on the left (its newest tokens kept) and ``max_tokens`` is capped so the
  sequence fits; ``completion_prompt_truncated`` is logged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.model.kv_cache import continuation_inputs, returned_cache

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]
"""Given the prompts of a batch's rows (in order), a context to run its forward passes in."""

Turn = Callable[[], AbstractContextManager[None]]
"""A context around all the work on one prompt (the daemon's: the engine lock)."""

MIN_LOGPROB = -9999.0
"""Log-probabilities are clamped to this, so that JSON never sees ``-inf`` or NaN."""


@dataclass(frozen=True)
class CompletionRequest:
    """An OpenAI-style completion request, already validated and bounded."""

    prompts: tuple[str, ...]
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class CompletionChoice:
    """One generated continuation (OpenAI's ``choices[i]``)."""

    index: int
    text: str
    finish_reason: str  # "stop" (eos or a stop string) | "length"
    tokens: tuple[str, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[dict[str, float], ...] | None = None
    text_offset: tuple[int, ...] = ()
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens


log = structlog.get_logger()


@dataclass(frozen=True)
class TokenLogprob:
    """One kept token's log-probability entry."""

    token: str  # the token's own text (special tokens spelt out)
    logprob: float
    top: tuple[tuple[str, float], ...]  # the most likely alternatives, best first, distinct texts
    offset: int  # where the token starts in the choice's text


@dataclass(frozen=True)
class CompletionDelta:
    """What one step of :func:`stream` adds to choice ``index``: new text (maybe empty),
    the log-probability entries of the tokens that start in it (when asked for), and,
    on the choice's last delta, its finish reason and usage."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" on the last delta, else None
    usage: dict[str, int] | None = None  # prompt_tokens, completion_tokens (last delta)


@dataclass(frozen=True)
class _Step:
    """One generated token: its id, its log-probability and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    routing: Routing,
    *,
    turn: Turn = nullcontext,
) -> list[CompletionChoice]:
    """One :class:`CompletionChoice` per prompt of ``request``, in order: the deltas of
    :func:`stream` joined."""
    started = time.perf_counter()
    choices = collect(request, stream(model, tokenizer, request, routing, turn=turn))
    log.debug(
        "completions_generated",
        prompts=len(request.prompts),
        completion_tokens=sum(c.usage.get("completion_tokens", 0) for c in choices),
        seconds=round(time.perf_counter() - started, 4),
    )
    return choices


def stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    routing: Routing,
    *,
    turn: Turn = nullcontext,
) -> Generator[CompletionDelta, None, None]:
    """The choices of ``request`` as deltas: one per generated token (eos excepted) and a
    last one per prompt, prompt after prompt. Each prompt is tokenised, generated and
    decoded inside its own ``turn()``, held until its last delta has been taken."""
    generator = _generator(request.seed)
    for index, prompt in enumerate(request.prompts):
        with turn(), _inference(model):
            yield from _stream_one(model, tokenizer, request, routing, index, prompt, generator)


def collect(
    request: CompletionRequest, deltas: Iterable[CompletionDelta]
) -> list[CompletionChoice]:
    """The choices that ``deltas`` (of ``request``) spell, in index order."""
    texts: dict[int, list[str]] = {}
    entries: dict[int, list[TokenLogprob]] = {}
    ends: dict[int, CompletionDelta] = {}
    for delta in deltas:
        texts.setdefault(delta.index, []).append(delta.text)
        entries.setdefault(delta.index, []).extend(delta.logprobs)
        if delta.finish_reason is not None:
            ends[delta.index] = delta
    choices: list[CompletionChoice] = []
    for index in sorted(ends):
        end, text, kept = ends[index], "".join(texts[index]), entries[index]
        finish, usage = end.finish_reason or "length", dict(end.usage or {})
        if request.logprobs is None:
            choices.append(CompletionChoice(index, text, finish, usage=usage))
            continue
        shift = len(request.prompts[index])
        choices.append(
            CompletionChoice(
                index=index,
                text=text,
                finish_reason=finish,
                tokens=tuple(e.token for e in kept),
                token_logprobs=tuple(e.logprob for e in kept),
                top_logprobs=tuple(dict(e.top) for e in kept),
                text_offset=tuple(shift + e.offset for e in kept),
                usage=usage,
            )
        )
    return choices


def _stream_one(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    routing: Routing,
    index: int,
    prompt: str,
    generator: torch.Generator,
) -> Iterator[CompletionDelta]:
    prompt_ids, max_new = _fit_context(model, tokenizer, prompt, request.max_tokens)
    text = _TextStream(tokenizer, request.stop, with_logprobs=request.logprobs is not None)
    eos = tokenizer.eos_token_id
    generated, hit_eos = 0, False
    if max_new > 0:
        with (
            routing([prompt]),
            closing(_steps(model, request, prompt_ids, max_new, generator)) as steps,
        ):
            for step in steps:
                generated += 1
                if eos is not None and step.token_id == eos:
                    hit_eos = True
                    break
                piece, entries = text.push(step)
                yield CompletionDelta(index, piece, entries)
                if text.stopped:
                    break
    rest, entries = text.finish()
    yield CompletionDelta(
        index,
        rest,
        entries,
        finish_reason="stop" if hit_eos or text.stopped else "length",
        usage={"prompt_tokens": len(prompt_ids), "completion_tokens": generated},
    )


class _TextStream:
    """One choice's text as its tokens arrive, and how much of it may be handed out."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], *, with_logprobs: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.with_logprobs = with_logprobs
        self.ids: list[int] = []
        self.text = ""  # the decoded text of every token so far
        self.sent = ""  # handed out so far: a prefix of ``text``
        self.entries: list[TokenLogprob] = []
        self.released = 0  # entries handed out
        self.cut: int | None = None  # where the first stop string starts

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def push(self, step: _Step) -> tuple[str, tuple[TokenLogprob, ...]]:
        """Add a generated token; the text (and entries) that may go out now."""
        offset = len(self.text)
        self.ids.append(step.token_id)
        self.text = _decode(self.tokenizer, self.ids)
        if self.with_logprobs:
            self.entries.append(
                TokenLogprob(
                    token=_token_text(self.tokenizer, step.token_id),
                    logprob=step.logprob,
                    top=_top_pairs(self.tokenizer, step.top),
                    offset=offset,
                )
            )
        self.cut = _first_stop(self.text, self.stops)
        if self.cut is not None:
            return "", ()
        return self._release(_settled_end(self.text, self.stops))

    def finish(self) -> tuple[str, tuple[TokenLogprob, ...]]:
        """The rest of the text (cut before a stop string) and of the kept entries."""
        final = self.text if self.cut is None else self.text[: self.cut]
        kept = [e for e in self.entries if self.cut is None or e.offset < self.cut]
        rest = kept[self.released :]
        self.released = len(kept)
        if not final.startswith(self.sent):
            # a tokenizer whose decoding changed text already handed out: keep what was sent
            log.warning("completion_text_diverged", sent=len(self.sent), final=len(final))
            return "", tuple(rest)
        piece, self.sent = final[len(self.sent) :], final
        return piece, tuple(rest)

    def _release(self, end: int) -> tuple[str, tuple[TokenLogprob, ...]]:
        if end <= len(self.sent) or not self.text.startswith(self.sent):
            return "", ()
        piece, self.sent = self.text[len(self.sent) : end], self.text[:end]
        upto = self.released
        while upto < len(self.entries) and self.entries[upto].offset < end:
            upto += 1
        out = tuple(self.entries[self.released : upto])
        self.released = upto
        return piece, out


def _settled_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can no longer change as tokens follow (see the module doc)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    head = text[:end].rstrip()
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(head)), held, -1):
            if head.endswith(stop[:k]):
                held = k
                break
    return len(head) - held


@contextmanager
def _inference(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode without gradients for one prompt (inside its turn, so the mode is
    restored before the daemon's engine lock goes)."""
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _steps(
    model: PreTrainedModel,
    request: CompletionRequest,
    prompt_ids: list[int],
    max_new: int,
    generator: torch.Generator,
) -> Generator[_Step, None, None]:
    """Token loop over a key/value cache: at most ``max_new`` tokens; the caller stops it."""
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache: Any = None
    seen = 0  # tokens in the cache
    for _ in range(max_new):
        out = cast(Any, model)(**continuation_inputs(model, inputs, cache, seen))
        cache = returned_cache(out)
        seen += int(inputs.shape[1])
        step = _pick(out.logits[0, -1].float(), request, generator)  # logits (V,)
        yield step
        inputs = torch.tensor([[step.token_id]], dtype=torch.long, device=device)


def _pick(logits: torch.Tensor, request: CompletionRequest, generator: torch.Generator) -> _Step:
    """The next token (greedy or sampled) with its model log-probability and top-k."""
    logprobs = torch.log_softmax(logits, dim=-1)  # (V,), temperature 1
    if request.temperature <= 0:
        token_id = int(torch.argmax(logits).item())
    else:
        token_id = _sample(logits, request.temperature, request.top_p, generator)
    top: tuple[tuple[int, float], ...] = ()
    k = min(request.logprobs or 0, logprobs.shape[0])
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = tuple(
            (int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        )
    return _Step(token_id=token_id, logprob=_finite(float(logprobs[token_id])), top=top)


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Sample from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of better tokens
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(torch.argmax(logits).item())
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(choice.item())


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator (sampling draws on the CPU), seeded by ``seed`` or non-deterministically."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def _fit_context(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int
) -> tuple[list[int], int]:
    """The prompt's token ids and the number of new tokens, both fitted to the context."""
    ids: list[int] = list(tokenizer(prompt)["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        start = start if start is not None else tokenizer.eos_token_id
        ids = [int(start if start is not None else 0)]
    max_new = max(0, max_tokens)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 1 and len(ids) + max_new > context:
        max_new = min(max_new, context - 1)
        keep = context - max_new
        log.warning(
            "completion_prompt_truncated",
            prompt_tokens=len(ids),
            kept_tokens=min(keep, len(ids)),
            max_tokens=max_new,
            context=context,
        )
        ids = ids[-keep:]
    return ids, max_new


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest non-empty stop string starts in ``text``, or ``None``."""
    found = [pos for pos in (text.find(s) for s in stops if s) if pos >= 0]
    return min(found) if found else None


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if not ids:
        return ""
    return cast(str, tokenizer.decode(ids, skip_special_tokens=True))


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return cast(str, tokenizer.decode([token_id], skip_special_tokens=False))


def _top_pairs(
    tokenizer: PreTrainedTokenizerBase, top: tuple[tuple[int, float], ...]
) -> tuple[tuple[str, float], ...]:
    """The alternatives as (text, logprob), best first; a text met twice keeps its first."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(_token_text(tokenizer, token_id), logprob)
    return tuple(out.items())


def _finite(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) else max(value, MIN_LOGPROB)
