"""Subject and prompt-end token positions, with real GPT-2 BPE and a BOS-adding tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from daemon.errors import SubjectNotFoundError
from daemon.model.tokens import (
    batch_subject_last_token_indices,
    last_prompt_token_indices,
    subject_char_span,
    subject_last_token_index,
)


def _token_at(tokenizer: PreTrainedTokenizerBase, prompt: str, index: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    return str(tokenizer.convert_ids_to_tokens(ids)[index])


@pytest.mark.parametrize(
    ("prompt", "subject", "index", "token"),
    [
        # start of the prompt; the subject's first word splits into two tokens
        ("Acme Corporation hired a new chief", "Acme Corporation", 2, "ĠCorporation"),
        ("Acme Corporation hired a new chief", "Acme", 1, "me"),
        # middle, multi-token name (ĠE iff el ĠTower): the last one counts
        ("The Eiffel Tower is located in", "Eiffel Tower", 4, "ĠTower"),
        # end of the prompt
        ("The chief executive of Acme is Jane Roe", "Jane Roe", 8, "ĠRoe"),
        # the subject ends inside a token: that token counts
        ("The Beatles played", "Beat", 1, "ĠBeatles"),
        # the first occurrence wins
        ("Paris is in France. Paris is big", "Paris", 0, "Paris"),
        # surrounding whitespace in the subject is ignored
        ("The chief executive of Acme is Jane Roe", " Acme ", 5, "me"),
    ],
)
def test_gpt2_subject_last_token(
    gpt2_tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str, index: int, token: str
) -> None:
    """Leading-space BPE tokens (ĠTower spans ' Tower') are matched by character offsets."""
    found = subject_last_token_index(gpt2_tokenizer, prompt, subject)
    assert found == index
    assert _token_at(gpt2_tokenizer, prompt, found) == token


@pytest.mark.parametrize(
    ("prompt", "subject", "token"),
    [
        ("Jane Roe was born in Paris", "Jane Roe", "Roe"),
        ("The chief executive of Acme is Jane Roe", "Acme", "Acme"),
        ("The chief executive of Acme is Jane Roe", "Jane Roe", "Roe"),
        ("Bill Lumbergh works for Initech", "Initech", "Initech"),
    ],
)
def test_bos_tokenizer_counts_the_bos(
    bos_tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str, token: str
) -> None:
    """With ``<s>`` prepended the index is one more than without, and points at the subject."""
    with_bos = subject_last_token_index(bos_tokenizer, prompt, subject)
    without = subject_last_token_index(bos_tokenizer, prompt, subject, add_special_tokens=False)
    assert bos_tokenizer(prompt)["input_ids"][0] == bos_tokenizer.bos_token_id
    assert with_bos == without + 1
    assert _token_at(bos_tokenizer, prompt, with_bos).lstrip("▁") == token


def test_absent_or_empty_subject_is_an_error(gpt2_tokenizer: PreTrainedTokenizerBase) -> None:
    """A subject not in the prompt raises SubjectNotFoundError on field 'subject'."""
    with pytest.raises(SubjectNotFoundError) as info:
        subject_last_token_index(gpt2_tokenizer, "The CEO of Acme is", "Initech")
    assert info.value.field == "subject"
    assert "Initech" in str(info.value)
    with pytest.raises(SubjectNotFoundError, match="empty"):
        subject_last_token_index(gpt2_tokenizer, "The CEO of Acme is", "  ")
    with pytest.raises(SubjectNotFoundError):  # matching is case-sensitive
        subject_char_span("The CEO of acme is", "Acme")


PROMPTS = [
    "Jane Roe was born in Paris",
    "The chief executive of Acme is Jane Roe",
    "Acme Corporation hired a new chief",
]
SUBJECTS = ["Jane Roe", "Acme", "Acme Corporation"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["gpt2", "bos"])
def test_batch_indices_follow_the_padding(
    side: str,
    which: str,
    gpt2_tokenizer: PreTrainedTokenizerBase,
    bos_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """In a padded batch each index points at the same token as in the unpadded prompt."""
    tokenizer = copy.deepcopy(gpt2_tokenizer if which == "gpt2" else bos_tokenizer)
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    indices = batch_subject_last_token_indices(
        tokenizer, PROMPTS, SUBJECTS, batch["attention_mask"]
    )
    width = batch["input_ids"].shape[1]
    for row, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS, strict=True)):
        single = subject_last_token_index(tokenizer, prompt, subject)
        n_real = len(tokenizer(prompt)["input_ids"])
        shift = width - n_real if side == "left" else 0
        assert indices[row] == single + shift
        assert batch["input_ids"][row, indices[row]] == tokenizer(prompt)["input_ids"][single]
    assert batch["attention_mask"].sum(dim=1).min() < width, "the batch really is padded"


def test_batch_errors_name_the_row(gpt2_tokenizer: PreTrainedTokenizerBase) -> None:
    """A missing subject names its row; mismatched lengths and masks are refused."""
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # "Ac me Ġis Ġbig", "Paris Ġis Ġbig"
    with pytest.raises(SubjectNotFoundError) as info:
        batch_subject_last_token_indices(
            gpt2_tokenizer, ["Acme is big", "Paris is big"], ["Acme", "Rome"], mask
        )
    assert info.value.record == 1 and info.value.field == "subject"
    with pytest.raises(ValueError, match="must match"):
        batch_subject_last_token_indices(gpt2_tokenizer, ["Acme is"], ["Acme", "x"], mask)
    with pytest.raises(ValueError, match="real tokens"):
        batch_subject_last_token_indices(gpt2_tokenizer, ["Acme is"], ["Acme"], mask[:1])
    rows = ["Acme is big", "Paris is big"]
    assert batch_subject_last_token_indices(gpt2_tokenizer, rows, ["Acme", "Paris"], mask) == [1, 1]


def test_last_prompt_token_indices_left_and_right() -> None:
    """The last real position of each row, whichever side holds the padding."""
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_prompt_token_indices(right).tolist() == [2, 4, 0]
    assert last_prompt_token_indices(left).tolist() == [4, 4, 4]
    assert last_prompt_token_indices(right).dtype == torch.long
    with pytest.raises(ValueError, match="no real tokens"):
        last_prompt_token_indices(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_prompt_token_is_the_prompts_last_token(
    gpt2_tokenizer: PreTrainedTokenizerBase, side: str
) -> None:
    """On a real padded batch the index picks each prompt's final token id."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.padding_side = side
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    last = last_prompt_token_indices(batch["attention_mask"])
    for row, prompt in enumerate(PROMPTS):
        assert batch["input_ids"][row, last[row]] == tokenizer(prompt)["input_ids"][-1]
