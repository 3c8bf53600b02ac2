"""OpenAI-style text completions from a Hugging Face causal LM, one prompt at a time.

Each prompt is generated alone, with its own key/value cache, inside
``routing([prompt])``: editors that route per batch row (MELO) see exactly the
prompt whose rows they serve, and an unpadded single row needs no attention
mask or position ids (the greedy result equals
:func:`daemon.model.generate.greedy_continuations`). All the work on one prompt
(tokenising, eval mode, generation, decoding) lies inside one ``turn()``: the
daemon's engine takes its lock per prompt there, so a waiting edit batch can go
between two prompts of a request.

- ``temperature == 0``: greedy (argmax). Otherwise the logits are divided by the
  temperature, cut to the nucleus of mass ``top_p`` and sampled with a
  ``torch.Generator`` seeded by ``seed`` (one generator for the whole request, so
  a seeded request is reproducible).
- Finish reasons: ``"stop"`` for eos (not part of the text) or a stop string (the
  text is cut before the first one), else ``"length"``.
- ``logprobs=k``: for every kept token its string, its log-probability under the
  model's own distribution (``log_softmax`` of the logits, temperature 1), the
  ``k`` most likely alternatives and its ``text_offset``: the character offset in
  ``prompt + text``, so the first token's offset is ``len(prompt)`` (OpenAI's
  legacy format). A token is kept when it starts before the cut of a stop string.
- A prompt that does not fit the model's context together with ``max_tokens`` is
  cut on the left (its newest tokens kept) and ``max_tokens`` is capped so the
  sequence fits; ``completion_prompt_truncated`` is logged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    """One :class:`CompletionChoice` per prompt of ``request``, in order; each prompt is
    tokenised, generated and decoded inside its own ``turn()``."""
    started = time.perf_counter()
    generator = _generator(request.seed)
    choices: list[CompletionChoice] = []
    for index, prompt in enumerate(request.prompts):
        with turn(), _inference(model):
            choices.append(
                _complete_one(model, tokenizer, request, routing, index, prompt, generator)
            )
    log.debug(
        "completions_generated",
        prompts=len(request.prompts),
        completion_tokens=sum(c.usage.get("completion_tokens", 0) for c in choices),
        seconds=round(time.perf_counter() - started, 4),
    )
    return choices


def _complete_one(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    routing: Routing,
    index: int,
    prompt: str,
    generator: torch.Generator,
) -> CompletionChoice:
    prompt_ids, max_new = _fit_context(model, tokenizer, prompt, request.max_tokens)
    steps: list[_Step] = []
    if max_new > 0:
        with routing([prompt]):
            steps = _generate(model, tokenizer, request, prompt_ids, max_new, generator)
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(steps)}
    eos = tokenizer.eos_token_id
    hit_eos = bool(steps) and eos is not None and steps[-1].token_id == eos
    kept = steps[:-1] if hit_eos else steps
    ids = [s.token_id for s in kept]
    text = _decode(tokenizer, ids)
    cut = _first_stop(text, request.stop)
    finish = "stop" if hit_eos or cut is not None else "length"
    if cut is not None:
        text = text[:cut]
    if request.logprobs is None:
        return CompletionChoice(index=index, text=text, finish_reason=finish, usage=usage)
    offsets = [len(_decode(tokenizer, ids[:i])) for i in range(len(ids))]
    keep = sum(1 for offset in offsets if cut is None or offset < cut)
    return CompletionChoice(
        index=index,
        text=text,
        finish_reason=finish,
        tokens=tuple(_token_text(tokenizer, s.token_id) for s in kept[:keep]),
        token_logprobs=tuple(s.logprob for s in kept[:keep]),
        top_logprobs=tuple(_top_dict(tokenizer, s.top) for s in kept[:keep]),
        text_offset=tuple(len(prompt) + offset for offset in offsets[:keep]),
        usage=usage,
    )


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


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    request: CompletionRequest,
    prompt_ids: list[int],
    max_new: int,
    generator: torch.Generator,
) -> list[_Step]:
    """Token loop over a key/value cache; stops at eos, a stop string or ``max_new``."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    stops = tuple(s for s in request.stop if s)
    longest_stop = max((len(s) for s in stops), default=0)
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache: Any = None
    seen = 0  # tokens in the cache
    steps: list[_Step] = []
    text = ""
    for _ in range(max_new):
        out = cast(Any, model)(**continuation_inputs(model, inputs, cache, seen))
        cache = returned_cache(out)
        seen += int(inputs.shape[1])
        logits = out.logits[0, -1].float()  # (V,)
        step = _pick(logits, request, generator)
        steps.append(step)
        if eos is not None and step.token_id == eos:
            break
        if stops:
            new_text = _decode(tokenizer, [s.token_id for s in steps])
            window = new_text[max(0, len(text) - longest_stop) :]
            text = new_text
            if any(stop in window for stop in stops):
                break
        inputs = torch.tensor([[step.token_id]], dtype=torch.long, device=device)
    return steps


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


def _top_dict(
    tokenizer: PreTrainedTokenizerBase, top: tuple[tuple[int, float], ...]
) -> dict[str, float]:
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(_token_text(tokenizer, token_id), logprob)
    return out


def _finite(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) else max(value, MIN_LOGPROB)
