"""Scoring functions for knowledge editing: pure, tensors or strings in, numbers out.

Two ways to say an edit "took" on a prompt:

- **by generation** (what a user sees): the greedy continuation of the prompt
  begins with the target, and the target is not merely the start of a longer
  word (``" Paris"`` does not match ``" Parisian"``). Leading whitespace is
  ignored on both sides, since tokenizers differ on whether the space belongs
  to the prompt or the answer.
- **by teacher forcing** (what most papers report): with the prompt and the
  target fed in, the model's argmax at each target position equals the target
  token. Reported as the fraction of target tokens right, and as the stricter
  all-tokens-right flag.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from daemon.model.answers import continuation_matches


def generation_scores(continuations: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """``continuation_matches`` element-wise; the sequences must have equal length."""
    if len(continuations) != len(targets):
        raise ValueError(f"{len(continuations)} continuations for {len(targets)} targets")
    return [continuation_matches(c, t) for c, t in zip(continuations, targets, strict=True)]


def teacher_forced_token_accuracy(logits: torch.Tensor, target_ids: torch.Tensor) -> float:
    """Fraction of target tokens that are the argmax at their position.

    ``logits``: (T, V) — the model's logits at the positions that *predict* each
    target token (i.e. already shifted by one). ``target_ids``: (T,).
    """
    if logits.dim() != 2 or target_ids.dim() != 1 or logits.shape[0] != target_ids.shape[0]:
        raise ValueError(
            f"expected logits (T, V) and target_ids (T,), got {tuple(logits.shape)} "
            f"and {tuple(target_ids.shape)}"
        )
    if target_ids.numel() == 0:
        raise ValueError("empty target")
    predicted = logits.argmax(dim=-1)  # (T,)
    return float((predicted == target_ids).float().mean().item())


def target_logit_positions(prompt_len: int, target_len: int) -> torch.Tensor:
    """Positions in ``prompt + target`` whose logits predict the target tokens: (target_len,)."""
    if prompt_len < 1 or target_len < 1:
        raise ValueError("prompt and target must each have at least one token")
    return torch.arange(prompt_len - 1, prompt_len - 1 + target_len)


def mean(values: Sequence[float | bool]) -> float:
    """Arithmetic mean; an empty sequence has no score and raises."""
    if not values:
        raise ValueError("mean of an empty sequence")
    return float(sum(float(v) for v in values) / len(values))


def fraction_or_none(values: Sequence[float | bool]) -> float | None:
    """Like ``mean`` but ``None`` for an empty sequence (a metric with nothing to score)."""
    return mean(values) if values else None


def probability_wins(nll_wanted: Sequence[float], nll_other: Sequence[float]) -> list[bool]:
    """Per prompt, whether the wanted answer is the likelier one: its mean per-token
    negative log-likelihood is below the other's (CounterFact's ES / PS / NS, as ROME
    and MEMIT report them: ES and PS want the new target over the true one, NS the
    true one over the new)."""
    if len(nll_wanted) != len(nll_other):
        raise ValueError(f"{len(nll_wanted)} likelihoods against {len(nll_other)}")
    return [a < b for a, b in zip(nll_wanted, nll_other, strict=True)]
