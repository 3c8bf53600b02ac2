"""What the hook back-end accepts, and how one batch's edits of the same fact combine.

Pure functions over ``EditSpec``: an edit needs a subject in its prompt and a
target of 1..``max_target_tokens`` tokens; edits of the same fact (subject and
relation, else the prompt) in one batch merge into the first when their targets
agree and are all refused when they conflict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from daemon.editors.base import EditOutcome, EditSpec
from daemon.model.batches import target_token_ids


def fact_key(spec: EditSpec) -> str:
    """What makes two edits "the same fact": subject and relation, else the prompt."""
    if spec.relation and spec.subject:
        return f"{spec.subject.strip().casefold()}\x1f{spec.relation.strip().casefold()}"
    return f"prompt\x1f{spec.prompt.strip()}"


def refusal_reason(
    tokenizer: PreTrainedTokenizerBase, spec: EditSpec, max_target_tokens: int
) -> str | None:
    """Why the hook back-end cannot take ``spec`` (None when it can)."""
    if not spec.subject or not spec.subject.strip():
        return "the hook back-end needs a subject (the router sends such edits to MELO)"
    if spec.subject not in spec.prompt:
        return f"subject {spec.subject!r} does not occur in the prompt"
    n_tokens = len(target_token_ids(tokenizer, spec.prompt, spec.target))
    if n_tokens == 0:
        return "the target tokenises to nothing"
    if n_tokens > max_target_tokens:
        return (
            f"the target has {n_tokens} tokens, more than the hook back-end's limit "
            f"of {max_target_tokens}"
        )
    return None


def merge_batch(
    specs: Sequence[EditSpec],
) -> tuple[list[EditSpec], dict[str, list[str]], dict[str, str]]:
    """``(batch, merged, conflicts)`` of one batch (see the module docstring).

    ``batch`` keeps one spec per fact, ``merged`` maps each kept id to the ids
    merged into it, ``conflicts`` gives each conflicting edit id its reason.
    """
    groups: dict[str, list[EditSpec]] = {}
    for spec in specs:
        groups.setdefault(fact_key(spec), []).append(spec)
    batch: list[EditSpec] = []
    merged: dict[str, list[str]] = {}
    conflicts: dict[str, str] = {}
    for group in groups.values():
        targets = {s.target for s in group}
        if len(targets) > 1:
            ids = [s.edit_id for s in group]
            for s in group:
                conflicts[s.edit_id] = (
                    f"conflicting targets for the same fact in one batch "
                    f"(edits {ids}: {sorted(targets)})"
                )
            continue
        batch.append(group[0])
        merged[group[0].edit_id] = [s.edit_id for s in group[1:]]
    return batch, merged, conflicts


def refuse_all(
    batch: Sequence[EditSpec], merged: Mapping[str, list[str]], reason: str
) -> dict[str, EditOutcome]:
    """A refusal with ``reason`` for every edit of ``batch`` and every edit merged into one."""
    out: dict[str, EditOutcome] = {}
    for spec in batch:
        for edit_id in (spec.edit_id, *merged.get(spec.edit_id, [])):
            out[edit_id] = EditOutcome(edit_id, False, reason)
    return out
