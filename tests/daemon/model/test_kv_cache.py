"""Prefill or decode step, decided the same way whatever transformers and cache class do."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from daemon.model.kv_cache import (
    CACHE_KWARGS,
    cache_kwarg,
    continuation_inputs,
    is_prefill,
    past_length,
    returned_cache,
)
from tests.daemon.model.conftest import tiny_gpt2, tiny_llama

IDS = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def _record(model: PreTrainedModel) -> tuple[list[int], Any]:
    """Attach a pre-hook that records ``past_length`` of every forward of ``model``."""
    seen: list[int] = []

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(past_length(args, kwargs))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _generated_past_lengths(model: Any, new_tokens: int, **options: Any) -> list[int]:
    """``past_length`` of every forward of a greedy ``generate`` over the padded batch."""
    seen, handle = _record(model)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=IDS,
                attention_mask=MASK,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **options,
            )
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_has_one_prefill_then_decode_steps_for_every_cache_class(
    make: Any, cache_implementation: str
) -> None:
    """Left-padded batch generation: the first forward continues nothing, step k continues
    the 4 prompt columns plus k - 1 generated tokens, for a dynamic and a static cache."""
    seen = _generated_past_lengths(make(), 4, cache_implementation=cache_implementation)
    assert seen == [0, 4, 5, 6]


def test_uncached_generation_is_all_prefills() -> None:
    assert _generated_past_lengths(tiny_llama(), 3, use_cache=False) == [0, 0, 0]


def test_each_signal_alone() -> None:
    """Position ids decide first; without them cache_position, a wider 2-D mask, and last a
    cache object under either keyword (duck-typed), in that order."""
    one = torch.tensor([[12]])
    assert past_length((), {"input_ids": IDS, "position_ids": torch.tensor([[0, 1, 2, 3]])}) == 0
    left_padded = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2]])  # transformers 5.0 pads with 1
    assert is_prefill((IDS,), {"position_ids": left_padded})
    assert past_length((one,), {"position_ids": torch.tensor([[7]])}) == 7
    assert past_length((one,), {"cache_position": torch.tensor([9])}) == 9
    assert past_length((one,), {"attention_mask": torch.ones(1, 6, dtype=torch.long)}) == 5
    four_d = torch.zeros(1, 1, 1, 6)  # a static cache's prepared mask says nothing
    assert past_length((one,), {"attention_mask": four_d}) == 0

    class Held:
        def get_seq_length(self) -> int:
            return 3

    for name in CACHE_KWARGS:
        assert past_length((one,), {name: Held()}) == 3
    assert past_length((one,), {"position_ids": torch.tensor([[0]]), "cache": Held()}) == 0
    assert is_prefill((), {"inputs_embeds": torch.zeros(1, 4, 8)})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_continuation_inputs_match_one_uncached_forward(make: Any) -> None:
    """editd's own token loop: cache under the model's keyword, explicit positions; the
    last step's logits equal an uncached forward over the whole sequence."""
    model: Any = make()
    params = inspect.signature(model.forward).parameters
    assert cache_kwarg(model) in params
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    seen, handle = _record(model)
    cache, past = None, 0
    try:
        with torch.no_grad():
            for chunk in (tokens[:, :4], tokens[:, 4:5], tokens[:, 5:6]):
                out = model(**continuation_inputs(model, chunk, cache, past))
                cache = returned_cache(out)
                past += chunk.shape[1]
            full = model(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    assert seen[:3] == [0, 4, 5]
    assert cache is not None
    torch.testing.assert_close(out.logits[0, -1], full.logits[0, -1], rtol=1e-5, atol=1e-5)
