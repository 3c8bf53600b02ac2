"""Scoring a live (possibly edited) model on prompts: by generation and by teacher forcing.

All functions take an ``editor`` so that per-request routing (MELO) is in
effect exactly as it would be for a user's request: every forward pass runs
inside ``editor.routing(prompts)`` for the prompts of that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import Editor
from daemon.model.answers import continuation_matches
from daemon.model.batches import (
    encode_prompt_target,
    left_padded_position_ids,
    target_token_hits,
    target_token_ids,
)
from daemon.model.generate import greedy_continuations


def generate(
    editor: Editor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations under the editor's routing, batch by batch."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        with editor.routing(chunk):
            out.extend(
                greedy_continuations(
                    model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=len(chunk)
                )
            )
    return out


def generation_hits(
    editor: Editor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
) -> list[bool]:
    """Whether each prompt's greedy continuation starts with its target (see metrics)."""
    if not prompts:
        return []
    longest = max(
        len(target_token_ids(tokenizer, p, t)) for p, t in zip(prompts, targets, strict=True)
    )
    texts = generate(
        editor, model, tokenizer, prompts, max_new_tokens=longest + 1, batch_size=batch_size
    )
    return [continuation_matches(c, t) for c, t in zip(texts, targets, strict=True)]


PerRow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits, labels) -> (B,)``: one score per row of a prompt + target batch."""


@torch.no_grad()
def teacher_forced_accuracies(
    editor: Editor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    per_row: PerRow = target_token_hits,
) -> list[float]:
    """Per prompt, the fraction of target tokens that are the argmax given the true prefix;
    ``per_row=target_nll`` gives each target's mean negative log-likelihood instead.
    Batches are routed as the editor routes.
    """
    scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        p_chunk = list(prompts[start : start + batch_size])
        t_chunk = list(targets[start : start + batch_size])
        batch = encode_prompt_target(tokenizer, p_chunk, t_chunk).to(device)
        with editor.routing(p_chunk):
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=left_padded_position_ids(batch.attention_mask),
            ).logits
        scores.extend(per_row(logits, batch.labels).tolist())
    return scores
