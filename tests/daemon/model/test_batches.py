"""Prompt + target batches: which tokens are the target, and which logits predict them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from daemon.model.batches import (
    encode_prompt_target,
    label_window,
    left_pad,
    padded_forward_inputs,
    padding_id,
    target_nll,
    target_token_hits,
    target_token_ids,
)
from tests.daemon.model.conftest import tiny_gpt2


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tok.pad_token = tok.eos_token
    return tok


def test_leading_space_belongs_to_the_target_token(gpt2: PreTrainedTokenizerBase) -> None:
    """GPT-2 BPE merges the space into the word: " Paris" is one token, not " " + "Paris"."""
    ids = target_token_ids(gpt2, "The capital of France is", " Paris")
    assert ids == gpt2(" Paris")["input_ids"]
    assert gpt2.decode(ids) == " Paris"


def test_target_without_space_and_prompt_with_trailing_space(
    gpt2: PreTrainedTokenizerBase,
) -> None:
    """A prompt ending in a space merges differently; the target is still what decodes after."""
    ids = target_token_ids(gpt2, "The capital of France is ", "Paris")
    assert str(gpt2.decode(ids)).strip() == "Paris"


def test_multi_token_target(gpt2: PreTrainedTokenizerBase) -> None:
    ids = target_token_ids(gpt2, "The CEO of Acme is", " Jane Roeberts-Vandersloot")
    assert len(ids) > 2
    assert gpt2.decode(ids) == " Jane Roeberts-Vandersloot"


def test_labels_sit_one_position_before_each_target_token(gpt2: PreTrainedTokenizerBase) -> None:
    prompts = ["The capital of France is", "A"]
    targets = [" Paris", " very long answer here"]
    batch = encode_prompt_target(gpt2, prompts, targets)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    for row in range(2):
        target = target_token_ids(gpt2, prompts[row], targets[row])
        positions = (batch.labels[row] != -100).nonzero().flatten()
        # the label at position p is the token at p + 1, and those tokens are the target
        assert batch.labels[row, positions].tolist() == target
        assert batch.input_ids[row, positions + 1].tolist() == target
        # left padding: the row ends at the last column, pads (mask 0) come first
        assert batch.attention_mask[row, -1] == 1
        assert int(batch.prompt_last[row]) == int(positions[0])
    assert batch.attention_mask[1, 0] == 0


def test_nll_and_hits_on_constructed_logits() -> None:
    labels = torch.tensor([[-100, 2, 1, -100]])
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 1, 2] = 10.0  # right at position 1
    logits[0, 2, 0] = 10.0  # wrong at position 2 (wants 1)
    assert target_token_hits(logits, labels).tolist() == [0.5]
    nll = target_nll(logits, labels)
    assert nll.shape == (1,)
    assert 9.0 < float(nll[0]) < 11.0  # ~0 for the hit, ~20 for the miss, averaged


def test_mismatched_or_empty_input_is_refused(gpt2: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="equally many"):
        encode_prompt_target(gpt2, ["a"], [])


def test_left_pad_puts_pads_first_whatever_the_tokenizer_does() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty row"):
        left_pad([[1], []], pad_id=0)


def test_padding_id_falls_back_to_eos(gpt2: PreTrainedTokenizerBase) -> None:
    assert padding_id(gpt2) == gpt2.eos_token_id  # the fixture pads with eos


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_inputs_give_a_gpt2_row_its_positions_alone(side: str) -> None:
    """GPT-2's absolute positions: a padded row's logits equal the row's alone."""
    model = tiny_gpt2()
    with torch.no_grad():
        cast(Any, model).transformer.wpe.weight.mul_(50.0)  # positions matter a lot
    short, long = [3, 9, 4], [7, 1, 2, 8, 5, 6]
    if side == "left":
        ids = torch.tensor([[0, 0, 0, *short], long])
        real = slice(3, 6)
    else:
        ids = torch.tensor([[*short, 0, 0, 0], long])
        real = slice(0, 3)
    mask = torch.tensor([[int(real.start <= t < real.stop) for t in range(6)], [1] * 6])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short])).logits[0]
        padded = model(**padded_forward_inputs(ids, mask), use_cache=False).logits[0, real]
        shifted = model(input_ids=ids, attention_mask=mask).logits[0, real]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)
    if side == "left":  # without position ids the left-padded row is shifted
        assert not torch.allclose(shifted, alone, atol=1e-2)


def test_label_window_covers_every_labelled_column() -> None:
    labels = torch.full((3, 7), -100)
    assert label_window(labels) == 1  # nothing labelled: one column, never 0 (= all)
    labels[0, 5:] = 4
    labels[1, 3:6] = 2  # a row ending early (right padding) still counts
    assert label_window(labels) == 4
    labels[2, 0] = 1
    assert label_window(labels) == 7


@pytest.mark.parametrize("side", ["left", "right"])
def test_scoring_the_label_window_equals_scoring_every_column(
    gpt2: PreTrainedTokenizerBase, side: str
) -> None:
    """``logits_to_keep=label_window(labels)`` gives the same NLL, hits and gradient."""
    saved, gpt2.padding_side = gpt2.padding_side, side
    try:
        batch = encode_prompt_target(
            gpt2, ["The capital of France is", "Snow is"], [" Paris, of course", " white"]
        )
    finally:
        gpt2.padding_side = saved
    inputs = padded_forward_inputs(batch.input_ids, batch.attention_mask)
    keep = label_window(batch.labels)
    assert keep < batch.labels.shape[1] or side == "right"
    model = tiny_gpt2(vocab_size=len(gpt2))
    results = []
    for n, labels in ((0, batch.labels), (keep, batch.labels[:, -keep:])):
        model.zero_grad()
        logits = model(**inputs, use_cache=False, logits_to_keep=n).logits
        nll = target_nll(logits, labels)
        nll.sum().backward()  # type: ignore[no-untyped-call]
        grad = cast(Any, model).transformer.h[0].mlp.c_proj.weight.grad.clone()
        results.append((nll.detach(), target_token_hits(logits.detach(), labels), grad))
    (nll_all, hits_all, grad_all), (nll_kept, hits_kept, grad_kept) = results
    torch.testing.assert_close(nll_kept, nll_all)
    assert torch.equal(hits_kept, hits_all)
    torch.testing.assert_close(grad_kept, grad_all)
