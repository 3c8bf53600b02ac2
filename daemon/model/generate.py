"""Greedy generation in batches, and exact-match scoring of continuations.

Prompts are left-padded with an attention mask, so every prompt's last token
sits at the same position and the batch answer equals the one-by-one answer
(``model.generate`` derives position ids from the mask, which GPT-2 needs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

SENTENCE_ENDS = (".", "!", "?", "\n")


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of each prompt (decoded new text only; stops at eos)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.train(False)
    try:
        out: list[str] = []
        for chunk in _chunks(prompts, batch_size):
            out.extend(_generate_batch(model, tokenizer, chunk, max_new_tokens))
        return out
    finally:
        model.train(was_training)


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[str]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    enc = _left_padded(tokenizer, prompts, pad_id)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    generated = cast(Any, model).generate(
        input_ids=input_ids,
        attention_mask=enc["attention_mask"].to(device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = generated[:, input_ids.shape[1] :]
    return [
        cast(
            str,
            tokenizer.decode(
                _until_eos(row.tolist(), tokenizer.eos_token_id), skip_special_tokens=True
            ),
        )
        for row in new_tokens
    ]


def _left_padded(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], pad_id: int
) -> dict[str, torch.Tensor]:
    """Encode with the tokenizer's own special tokens, then pad on the left."""
    rows: list[list[int]] = tokenizer(list(prompts))["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def first_sentence(continuation: str) -> str:
    """``continuation`` cut before its first sentence end (``.``, ``!``, ``?``, newline)."""
    cut = len(continuation)
    for end in SENTENCE_ENDS:
        pos = continuation.find(end)
        if pos != -1:
            cut = min(cut, pos)
    return continuation[:cut].rstrip()
