"""Checks on a batch of edits before MELO spends any training on them.

Each check returns reasons per edit (an edit id maps to the first reason it
fails); the editor turns them into refused ``EditOutcome``s. Nothing here
changes state.

* ``size_reason``: the prompt (and every rephrase) tokenises to something, the
  target to at most ``max_target_tokens`` tokens, and prompt + target fit the
  model's context.
* ``conflict_reasons``: two edits of one batch that share a prompt text (an edit
  prompt or a rephrase) but want different targets are both refused; so is an
  edit whose prompt text an applied edit already answers differently (retract
  or supersede that one first). Identical text means an identical key, which
  the neuron index could not tell apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from daemon.editors.base import EditSpec
from daemon.model.batches import target_token_ids


def edit_prompts(spec: EditSpec) -> list[str]:
    """The prompt then its distinct rephrases (the rows MELO trains and indexes)."""
    return list(dict.fromkeys([spec.prompt, *spec.rephrases]))


def size_reason(
    tokenizer: PreTrainedTokenizerBase,
    spec: EditSpec,
    *,
    max_target_tokens: int,
    context: int | None,
) -> str | None:
    """Why ``spec`` cannot be trained (token counts), or None when it can."""
    for prompt in edit_prompts(spec):
        head: list[int] = tokenizer(prompt)["input_ids"]
        if not head:
            return f"prompt {prompt!r} tokenises to nothing"
        tail = target_token_ids(tokenizer, prompt, spec.target)
        if not tail:
            return f"target {spec.target!r} tokenises to nothing"
        if len(tail) > max_target_tokens:
            return f"target is {len(tail)} tokens, more than max_target_tokens={max_target_tokens}"
        if context is not None and len(head) + len(tail) > context:
            return (
                f"prompt {prompt!r} + target is {len(head) + len(tail)} tokens, more than "
                f"the model's context of {context}"
            )
    return None


def conflict_reasons(
    specs: Sequence[EditSpec], applied: Mapping[str, tuple[str, str]]
) -> dict[str, str]:
    """Edit id -> reason, for edits whose prompt texts clash on the target.

    ``applied`` maps each prompt text of the applied edits to ``(edit_id, target)``.
    """
    reasons: dict[str, str] = {}
    by_text: dict[str, list[EditSpec]] = {}
    for spec in specs:
        for text in edit_prompts(spec):
            by_text.setdefault(text, []).append(spec)
    for text, owners in by_text.items():
        if len({s.target for s in owners}) > 1:
            ids = [s.edit_id for s in owners]
            for spec in owners:
                others = [i for i in ids if i != spec.edit_id]
                reasons.setdefault(
                    spec.edit_id,
                    f"conflicts with edits {others} in the same batch: prompt {text!r} "
                    "has different targets",
                )
        held = applied.get(text)
        for spec in owners:
            if held is not None and held[1] != spec.target:
                reasons.setdefault(
                    spec.edit_id,
                    f"prompt {text!r} is already edited by '{held[0]}' to {held[1]!r}: "
                    "retract or supersede that edit first",
                )
    return reasons


def model_context(config: object) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``/``n_positions``)."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
