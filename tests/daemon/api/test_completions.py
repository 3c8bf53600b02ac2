"""``daemon.engine.completions.complete`` on the micro fact-world model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch

from daemon.engine.completions import (
    MIN_LOGPROB,
    CompletionRequest,
    _settled_end,
    collect,
    complete,
    stream,
)
from daemon.model.generate import greedy_continuations
from tests.daemon.api.conftest import RecordingRouting, WorldModel

PROMPTS = ("The capital of Vonmark is", "Shus Fismou works for", "")


def run(world: WorldModel, routing: RecordingRouting | None = None, **kwargs: Any) -> list[Any]:
    request = CompletionRequest(**{"prompts": PROMPTS, **kwargs})
    return complete(world.model, world.tokenizer, request, routing or RecordingRouting())


def test_greedy_equals_greedy_continuations(world_model: WorldModel) -> None:
    """temperature 0 gives exactly the repository's batched greedy generation."""
    choices = run(world_model, max_tokens=12)
    expected = greedy_continuations(
        world_model.model, world_model.tokenizer, list(PROMPTS), max_new_tokens=12
    )
    assert [c.text for c in choices] == expected
    assert [c.index for c in choices] == [0, 1, 2]


def test_finish_reasons_eos_and_length(world_model: WorldModel) -> None:
    """The micro world ends its facts with eos (stop); one token is cut by length."""
    long = run(world_model, max_tokens=40)
    assert all(c.finish_reason == "stop" for c in long)
    short = run(world_model, max_tokens=1)
    assert all(c.finish_reason == "length" for c in short)
    assert all(c.usage["completion_tokens"] == 1 for c in short)


def test_zero_max_tokens_runs_no_forward(world_model: WorldModel) -> None:
    routing = RecordingRouting()
    choices = run(world_model, routing, max_tokens=0)
    assert [c.text for c in choices] == ["", "", ""]
    assert routing.calls == []
    assert all(c.usage["prompt_tokens"] >= 1 for c in choices)


def test_stop_strings_cut_the_text(world_model: WorldModel) -> None:
    full = run(world_model, max_tokens=20)
    stopped = run(world_model, max_tokens=20, stop=(" is", "."), logprobs=1)
    for prompt, whole, cut in zip(PROMPTS, full, stopped, strict=True):
        assert cut.finish_reason == "stop"
        assert whole.text.startswith(cut.text)
        assert "." not in cut.text and " is" not in cut.text
        assert all(offset - len(prompt) < len(cut.text) for offset in cut.text_offset)
    assert stopped[0].text == full[0].text.split(".")[0]


def test_logprobs_are_the_model_log_softmax(world_model: WorldModel) -> None:
    """Each chosen token's logprob is the model's log_softmax at that step; top-k is sorted."""
    (choice,) = complete(
        world_model.model,
        world_model.tokenizer,
        CompletionRequest(prompts=(PROMPTS[0],), max_tokens=6, logprobs=3),
        RecordingRouting(),
    )
    tokenizer = world_model.tokenizer
    ids: list[int] = list(tokenizer(PROMPTS[0])["input_ids"])
    generated = tokenizer(PROMPTS[0] + choice.text)["input_ids"][len(ids) :]
    assert len(choice.tokens) == len(choice.token_logprobs) == len(choice.text_offset)
    assert choice.top_logprobs is not None and len(choice.top_logprobs) == len(choice.tokens)
    with torch.no_grad():
        for step, token_id in enumerate(generated):
            logits = cast(Any, world_model.model)(torch.tensor([ids])).logits[0, -1]
            expected = torch.log_softmax(logits, dim=-1)[token_id].item()
            assert choice.token_logprobs[step] == pytest.approx(expected, abs=1e-4)
            ids.append(token_id)
    for logprob, top in zip(choice.token_logprobs, choice.top_logprobs, strict=True):
        assert MIN_LOGPROB <= logprob <= 0
        assert len(top) == 3
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert max(top.values()) >= logprob - 1e-6
    assert "".join(choice.tokens) == choice.text
    assert choice.text_offset[0] == len(PROMPTS[0])


def test_routing_sees_each_prompt_alone_and_in_order(world_model: WorldModel) -> None:
    routing = RecordingRouting()
    run(world_model, routing, max_tokens=3)
    assert routing.calls == [(p,) for p in PROMPTS]


def test_every_forward_runs_inside_routing(world_model: WorldModel) -> None:
    """A forward hook sees the routing context open on every call."""
    open_prompts: list[tuple[str, ...]] = []
    seen: list[tuple[str, ...] | None] = []

    @contextmanager
    def routing(prompts: Any) -> Any:
        open_prompts.append(tuple(prompts))
        try:
            yield
        finally:
            open_prompts.pop()

    def hook(*_: Any) -> None:
        seen.append(open_prompts[-1] if open_prompts else None)

    model = cast(torch.nn.Module, world_model.model)
    handle = model.register_forward_hook(hook)
    try:
        complete(
            world_model.model,
            world_model.tokenizer,
            CompletionRequest(prompts=PROMPTS[:2], max_tokens=3),
            routing,
        )
    finally:
        handle.remove()
    assert seen and None not in seen
    assert seen[0] == (PROMPTS[0],) and seen[-1] == (PROMPTS[1],)


def test_seeded_sampling_is_reproducible(world_model: WorldModel) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 12, "temperature": 1.5, "top_p": 0.95}
    first = run(world_model, seed=11, **kwargs)
    second = run(world_model, seed=11, **kwargs)
    assert [c.text for c in first] == [c.text for c in second]
    texts = {tuple(c.text for c in run(world_model, seed=s, **kwargs)) for s in range(6)}
    assert len(texts) > 1


def test_tiny_top_p_is_greedy(world_model: WorldModel) -> None:
    """A nucleus of (almost) no mass keeps only the most likely token."""
    sampled = run(world_model, max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    greedy = run(world_model, max_tokens=10)
    assert [c.text for c in sampled] == [c.text for c in greedy]


def test_training_flag_is_restored(world_model: WorldModel) -> None:
    model = world_model.model
    model.train(True)
    try:
        run(world_model, max_tokens=2)
        assert model.training
    finally:
        model.train(False)
    run(world_model, max_tokens=2)
    assert not model.training


def test_long_prompt_is_fitted_to_the_context(world_model: WorldModel) -> None:
    """A prompt longer than the context keeps its newest tokens and still completes."""
    context = world_model.model.config.max_position_embeddings
    prompt = "The capital of Vonmark is Lunmouth. " * context
    (choice,) = complete(
        world_model.model,
        world_model.tokenizer,
        CompletionRequest(prompts=(prompt,), max_tokens=4),
        RecordingRouting(),
    )
    assert choice.usage["prompt_tokens"] + 4 <= context
    assert choice.usage["completion_tokens"] >= 1


# --- token by token ----------------------------------------------------------------------


def test_stream_deltas_join_to_the_choices(world_model: WorldModel) -> None:
    """One delta per generated token (eos excepted) plus a last one per prompt; the
    deltas join to exactly what ``complete`` returns, logprob entries included."""
    request = CompletionRequest(prompts=PROMPTS[:2], max_tokens=12, stop=(" is",), logprobs=2)
    deltas = list(stream(world_model.model, world_model.tokenizer, request, RecordingRouting()))
    choices = complete(world_model.model, world_model.tokenizer, request, RecordingRouting())
    assert collect(request, deltas) == choices
    for choice in choices:
        mine = [d for d in deltas if d.index == choice.index]
        assert [d.finish_reason is not None for d in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].usage == choice.usage
        eos = choice.finish_reason == "stop" and " is" not in choice.text
        assert len(mine) - 1 <= choice.usage["completion_tokens"]
        assert len(mine) - 1 >= choice.usage["completion_tokens"] - (1 if eos else 0)
        assert "".join(d.text for d in mine) == choice.text
        assert [e.token for d in mine for e in d.logprobs] == list(choice.tokens)


def test_text_is_handed_out_before_the_end(world_model: WorldModel) -> None:
    """Generation is streamed: text arrives in the per-token deltas, not only at the end."""
    request = CompletionRequest(prompts=(PROMPTS[0],), max_tokens=12)
    deltas = list(stream(world_model.model, world_model.tokenizer, request, RecordingRouting()))
    early = [d.text for d in deltas[:-1] if d.text]
    assert len(early) >= 2
    assert "".join(d.text for d in deltas).startswith("".join(early))


def test_closing_the_stream_stops_at_the_next_token(world_model: WorldModel) -> None:
    """A consumer that closes the generator ends generation at once: no further forward
    passes, and the turn (the daemon's engine lock) is left."""
    turns: list[str] = []

    @contextmanager
    def turn() -> Any:
        turns.append("enter")
        try:
            yield
        finally:
            turns.append("exit")

    forwards: list[int] = []
    model = cast(torch.nn.Module, world_model.model)
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        request = CompletionRequest(prompts=PROMPTS[:2], max_tokens=40)
        deltas = stream(
            world_model.model, world_model.tokenizer, request, RecordingRouting(), turn=turn
        )
        first = next(deltas)
        assert first.index == 0 and turns == ["enter"]
        deltas.close()
    finally:
        handle.remove()
    assert turns == ["enter", "exit"]
    assert len(forwards) == 1


@pytest.mark.parametrize(
    ("text", "stops", "settled"),
    [
        ("Paris", (), 5),
        ("Paris is \n", (), 8),  # trailing whitespace waits for the next token
        ("caf\ufffd", (), 3),  # an incomplete character waits
        ("Paris i", (" is",), 5),  # could be the start of a stop string
        ("Paris.", ("...",), 5),
        ("Paris", (" is",), 5),
    ],
)
def test_settled_text(text: str, stops: tuple[str, ...], settled: int) -> None:
    assert _settled_end(text, stops) == settled
