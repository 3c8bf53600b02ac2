"""Batched greedy generation agrees with one-by-one generation; exact-match helpers."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from daemon.model.generate import (
    first_sentence,
    greedy_continuations,
)
from daemon.world.tokenizer import train_bpe_tokenizer

CORPUS = [
    "The capital of Velmora is Tarsk.",
    "Jane Roe works for Acme.",
    "The chief executive of Initech is Bill Lumbergh.",
    "People in Dornia speak Dornish.",
] * 20
PROMPTS = [
    "The capital of Velmora is",
    "Jane Roe works for",
    "The chief executive of Initech is",
    "People in",
    "Acme",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def _tiny(arch: str, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    torch.manual_seed(0)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=64,
                **ids,
            )
        )
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_by_one_with_left_padding(
    arch: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Prompts of different lengths give the same continuation alone or in a batch."""
    model = _tiny(arch, tokenizer)
    batched = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert len(batched) == len(PROMPTS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_is_deterministic_and_restores_mode(
    arch: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = _tiny(arch, tokenizer)
    model.train()
    first = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2)
    second = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=3)
    assert first == second
    assert model.training


def _naive_greedy(model: PreTrainedModel, tok: PreTrainedTokenizerFast, prompt: str, n: int) -> str:
    """Reference: full forward pass per step, no cache, no padding."""
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return str(tok.decode(new, skip_special_tokens=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_a_naive_greedy_loop(arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    """Only the new text comes back, and it is the argmax continuation."""
    model = _tiny(arch, tokenizer)
    model.train(False)
    outs = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=4)
    assert outs == [_naive_greedy(model, tokenizer, p, 4) for p in PROMPTS]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stops_at_eos(arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    """A model that always predicts eos yields empty continuations."""
    model = _tiny(arch, tokenizer)
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    outs = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=4)
    assert outs == [""] * len(PROMPTS)


def test_bad_arguments_are_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    model = _tiny("llama", tokenizer)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=1, batch_size=0)


def test_first_sentence() -> None:
    assert first_sentence(" Velmora. The capital") == " Velmora"
    assert first_sentence(" Velmora") == " Velmora"
    assert first_sentence(" Velmora is big\nand") == " Velmora is big"
    assert first_sentence(".") == ""


def test_gpt2_generate_counts_positions_from_the_mask(tokenizer: PreTrainedTokenizerFast) -> None:
    """``generate`` (transformers 5) derives GPT-2's position ids from the attention mask:
    a left-padded row's prefill starts at position 0 and each decode step continues it,
    so batched answers equal one-by-one answers even where positions matter a lot."""
    model = _tiny("gpt2", tokenizer)
    model.train(False)
    with torch.no_grad():
        cast(Any, model).transformer.wpe.weight.mul_(50.0)
    seen: list[torch.Tensor] = []
    handle = cast(Any, model).transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"]), with_kwargs=True
    )
    try:
        batched = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=8)
    finally:
        handle.remove()
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    width = max(lengths)
    prefill = seen[0]
    for row, n in enumerate(lengths):
        assert prefill[row, width - n :].tolist() == list(range(n))
        assert int(seen[1][row, -1]) == n  # the first new token follows the prompt
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=4)[0] for p in PROMPTS]
    assert batched == alone
