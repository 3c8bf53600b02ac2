"""Token positions: where the subject ends in a prompt, where each prompt ends in a batch.

Positions come from character offsets (``return_offsets_mapping=True``, so a fast
tokenizer is required), never from re-tokenising substrings, which goes wrong
with leading-space BPE: GPT-2 tokenises " Acme" as ``ĠAcme`` whose span starts at
the space, and a subject that ends inside a word ends inside a token.

The subject's last token is the last token whose character span overlaps the
FIRST occurrence of the subject in the prompt. Special tokens (a BOS such as
``<s>``) have empty spans and never match, but they do count in the returned
index, which is an index into ``input_ids`` exactly as the tokenizer produces
them with the same ``add_special_tokens``.

:func:`subject_grams` gives the token n-grams that name a subject in a sequence (the
hook's subject scope and MELO's subject routing both match them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from daemon.errors import SubjectNotFoundError


def subject_char_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span ``(start, end)`` of the first occurrence of ``subject`` (stripped)."""
    needle = subject.strip()
    if not needle:
        raise SubjectNotFoundError("subject is empty", field="subject")
    start = prompt.find(needle)
    if start < 0:
        raise SubjectNotFoundError(
            f"subject '{needle}' does not occur in the prompt", field="subject"
        )
    return start, start + len(needle)


def _offsets(
    tokenizer: PreTrainedTokenizerBase, prompt: str, add_special_tokens: bool
) -> list[tuple[int, int]]:
    if not tokenizer.is_fast:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (offsets needed)")
    encoded = tokenizer(
        prompt,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        padding=False,
        truncation=False,
    )
    return [(int(s), int(e)) for s, e in encoded["offset_mapping"]]


def _last_overlapping(offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """The last token whose (non-empty) span overlaps ``[start, end)``."""
    for index in range(len(offsets) - 1, -1, -1):
        s, e = offsets[index]
        if e > s and s < end and e > start:
            return index
    raise SubjectNotFoundError("subject maps to no token of the prompt", field="subject")


def _subject_index_and_length(
    tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str, add_special_tokens: bool
) -> tuple[int, int]:
    start, end = subject_char_span(prompt, subject)
    offsets = _offsets(tokenizer, prompt, add_special_tokens)
    return _last_overlapping(offsets, start, end), len(offsets)


def subject_last_token_index(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    *,
    add_special_tokens: bool = True,
) -> int:
    """Index in the tokenised ``prompt`` of the last token of the subject's first occurrence.

    Leading/trailing whitespace of ``subject`` is ignored. Raises
    ``SubjectNotFoundError`` (field ``subject``) when the subject is absent.
    """
    return _subject_index_and_length(tokenizer, prompt, subject, add_special_tokens)[0]


def batch_subject_last_token_indices(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    subjects: Sequence[str],
    attention_mask: torch.Tensor,
    *,
    add_special_tokens: bool = True,
) -> list[int]:
    """Subject last-token positions in a PADDED batch of ``prompts``.

    ``attention_mask`` ``[B, T]`` is the batch's own mask; row ``b``'s ``k``-th
    real token sits at the ``k``-th masked-in position, which covers left padding
    (shifted by the pad count) and right padding (unshifted) alike. The batch must
    have been tokenised with the same ``add_special_tokens`` and no truncation.
    """
    if not len(prompts) == len(subjects) == attention_mask.shape[0]:
        raise ValueError(
            f"{len(prompts)} prompts, {len(subjects)} subjects and "
            f"{attention_mask.shape[0]} mask rows: they must match"
        )
    out: list[int] = []
    for row, (prompt, subject) in enumerate(zip(prompts, subjects, strict=True)):
        try:
            index, length = _subject_index_and_length(
                tokenizer, prompt, subject, add_special_tokens
            )
        except SubjectNotFoundError as e:
            raise SubjectNotFoundError(e.reason, field="subject", record=row) from e
        real = torch.nonzero(attention_mask[row], as_tuple=False).flatten()  # [n_real]
        if real.numel() != length:
            raise ValueError(
                f"row {row}: the mask has {real.numel()} real tokens but the prompt "
                f"tokenises to {length} (different add_special_tokens or truncation?)"
            )
        out.append(int(real[index]))
    return out


def last_prompt_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """The last real (mask 1) position of each row, for left- or right-padded batches.

    ``attention_mask`` is ``[B, T]``; returns a long tensor ``[B]``.
    """
    mask = attention_mask.to(torch.bool)  # [B, T]
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real tokens")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask, positions, -1).max(dim=1).values  # [B]


TokenGram = tuple[int, ...]


def subject_grams(
    tokenizer: PreTrainedTokenizerBase, subject: str, prompt: str | None = None
) -> frozenset[TokenGram]:
    """The token-id n-grams that stand for ``subject`` in a sequence.

    The subject alone, with one leading space, and (when ``prompt`` contains it) the
    tokens whose character spans overlap its first occurrence in ``prompt``.
    """
    needle = subject.strip()
    grams: set[TokenGram] = set()
    if not needle:
        return frozenset()
    for text in (needle, " " + needle):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            grams.add(tuple(int(i) for i in ids))
    start = -1 if prompt is None else prompt.find(needle)
    if prompt is not None and start >= 0 and tokenizer.is_fast:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        end = start + len(needle)
        spans = enc["offset_mapping"]
        inside = [i for i, (s, e) in enumerate(spans) if e > s and s < end and e > start]
        if inside:
            grams.add(tuple(int(t) for t in enc["input_ids"][inside[0] : inside[-1] + 1]))
    return frozenset(grams)
