"""Encoding ``prompt + target`` pairs into one left-padded batch.

Used wherever a target is scored or optimised (teacher-forced metrics, the FT
baseline, the editors' target optimisation), so all of them agree on which
tokens are "the target" and which logits predict them.

Any forward over a padded batch goes through :func:`padded_forward_inputs`, which
adds position ids counted from each row's first real token: GPT-2's absolute
position embeddings would otherwise see a left-padded row at shifted positions.
(``generate`` derives the same position ids from the attention mask itself.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def target_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """The tokens of ``target`` as they appear after ``prompt`` (context-aware BPE).

    Tokenizes ``prompt + target`` and drops the prompt's tokens, so a leading
    space merges the way the model saw it in training. When the boundary token
    merges across prompt and target, falls back to the target tokenized alone.
    """
    full: list[int] = tokenizer(prompt + target)["input_ids"]
    head: list[int] = tokenizer(prompt)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head) :]
    alone: list[int] = tokenizer(target, add_special_tokens=False)["input_ids"]
    return alone


@dataclass(frozen=True)
class PromptTargetBatch:
    """A left-padded batch of ``prompt + target`` token rows.

    ``labels`` is -100 everywhere except at target tokens, already aligned with
    the *logits that predict them* (position t holds the token at t + 1), so
    ``cross_entropy(logits.transpose(1, 2), labels)`` is the target NLL.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 outside the targets
    prompt_last: torch.Tensor  # (B,) index of each prompt's last token

    def to(self, device: torch.device) -> PromptTargetBatch:
        return PromptTargetBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.prompt_last.to(device),
        )


def encode_prompt_target(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
) -> PromptTargetBatch:
    """Encode pairs into one left-padded batch with shifted target labels."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(
            f"need equally many prompts and targets, got {len(prompts)}/{len(targets)}"
        )
    rows: list[tuple[list[int], int]] = []
    for prompt, target in zip(prompts, targets, strict=True):
        head: list[int] = tokenizer(prompt)["input_ids"]
        tail = target_token_ids(tokenizer, prompt, target)
        if not head or not tail:
            raise ValueError(f"prompt or target tokenizes to nothing: {prompt!r} / {target!r}")
        rows.append((head + tail, len(head)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    prompt_last = torch.zeros(len(rows), dtype=torch.long)
    for i, (row, prompt_len) in enumerate(rows):
        offset = width - len(row)
        ids[i, offset:] = torch.tensor(row)
        mask[i, offset:] = 1
        # logits at position p predict token p + 1: target tokens start at offset + prompt_len
        start = offset + prompt_len - 1
        labels[i, start : width - 1] = torch.tensor(row[prompt_len:])
        prompt_last[i] = offset + prompt_len - 1
    return PromptTargetBatch(ids, mask, labels, prompt_last)


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token of a padded batch: (B, T).

    Models with absolute position embeddings (GPT-2) otherwise give a left-padded
    row's tokens other positions than the same prompt alone; rotary ones (Llama) only
    see relative positions and are unaffected. The count runs over real tokens only,
    as ``generate`` computes it, so a right-padded row gets ``0 .. n-1`` as well; pads
    get whatever the count is there (0 before the first real token).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_forward_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Keyword arguments of a forward pass over a padded batch: ids, mask and position ids.

    ``model(**padded_forward_inputs(ids, mask), use_cache=False)`` gives every row the
    positions it has alone, whichever side it is padded on (see
    :func:`left_padded_position_ids`).
    """
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": left_padded_position_ids(attention_mask),
    }


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the pad token, else eos, else 0 (pads are masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left into ``(input_ids, attention_mask)``, both (B, T) long.

    Independent of ``tokenizer.padding_side``, so callers that index from the right
    (a row's last token is column -1) hold on any tokenizer.
    """
    if not rows or not all(rows):
        raise ValueError("need at least one row, and no empty row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def label_window(labels: torch.Tensor) -> int:
    """How many trailing columns of ``labels`` ``(B, T)`` hold every labelled position
    (at least 1). Left-padded prompt+target rows end together, so their targets sit in
    the last columns: a forward with ``logits_to_keep=n`` then computes the LM head (a
    fifth of a small model's FLOPs, and a softmax over the vocabulary) only there, and
    ``labels[:, -n:]`` scores those logits."""
    labelled = (labels != -100).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return 1
    return int(labels.shape[1]) - int(labelled[0, 0])


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per row over its target tokens: (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = labels != -100  # (B, T)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -(picked * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def target_token_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of target tokens that are the argmax: (B,)."""
    mask = labels != -100
    hits = (logits.argmax(dim=-1) == labels) & mask
    return hits.sum(dim=1).float() / mask.sum(dim=1).clamp(min=1).float()
