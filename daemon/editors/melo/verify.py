"""Whether MELO accepts an edit: checks before any training, verification after it.

Before training, each check returns reasons per edit (an edit id maps to the first
reason it fails); the editor turns them into refused ``EditOutcome``s. The checks
change no state.

* ``size_reason``: the prompt (and every rephrase) tokenises to something, the
  target to at most ``max_target_tokens`` tokens, and prompt + target fit the
  model's context.
* ``conflict_reasons``: two edits of one batch that share a prompt text (an edit
  prompt or a rephrase) but want different targets are both refused; so is an
  edit whose prompt text an applied edit already answers differently (retract
  or supersede that one first). Identical text means an identical key, which
  the neuron index could not tell apart.

After training, the pieces of the insert-and-verify transaction, which
``editor.MeloEditor._insert_verified`` runs on the live neuron index inside an
insert transaction (``NeuronIndex.begin``), rolled back when verification fails:

* ``insert_keys`` adds each edit's keys (prompt and rephrases) and reports the
  edits refused for an identical-key conflict and the edits whose keys a split
  displaced (logged as ``melo_keys_displaced``).
* ``watch_routes`` / ``rerouted`` find applied edits whose prompt now routes
  differently: a new cluster can open nearer to an applied key than its own
  cluster's centre, a split can shrink its cluster. Only prompts within twice the
  radius of a new key can be affected (a new centre must come within one radius
  of them, a split cluster spans two), so only those are queried, before the
  insert (``watch_routes``) and after it (``rerouted``).
* ``generation_failures`` is the verification itself: real greedy generation
  under the editor's routing, judged by ``continuation_matches`` (the same rule
  the evaluation uses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import structlog
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import EditSpec
from daemon.editors.melo.index import AddResult, NeuronIndex
from daemon.editors.melo.keys import F32, KeyTable
from daemon.errors import EditConflictError
from daemon.model.answers import continuation_matches
from daemon.model.batches import target_token_ids
from daemon.model.generate import greedy_continuations

log = structlog.get_logger()

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]


# --- before training: checks ------------------------------------------------------------


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


# --- after training: insert and verify ----------------------------------------------------


def insert_keys(
    index: NeuronIndex,
    specs: Sequence[EditSpec],
    block: int,
    keys: Mapping[str, F32],
    label: Callable[[EditSpec], str] = lambda spec: spec.target,
    texts: Callable[[EditSpec], list[str]] = edit_prompts,
    radius: Callable[[EditSpec], float | None] = lambda spec: None,
) -> tuple[dict[str, str], set[str]]:
    """Add each spec's keys under ``block``, clustered by ``label(spec)`` (the index's
    "target"), each with its own ``radius(spec)`` (None: the index's); return (conflict
    reason per edit, displaced ids)."""
    conflicts: dict[str, str] = {}
    results: list[AddResult] = []
    for spec in specs:
        named = texts(spec)
        try:
            results.extend(
                index.add_batch(
                    [spec.edit_id] * len(named),
                    np.stack([keys[t] for t in named]),
                    [label(spec)] * len(named),
                    block,
                    radius=radius(spec),
                )
            )
        except EditConflictError as exc:
            conflicts[spec.edit_id] = str(exc)
    for r in results:
        if r.displaced:
            log.info(
                "melo_keys_displaced",
                edit_id=r.edit_id,
                cluster_id=r.cluster_id,
                displaced=[(d.edit_id, d.from_cluster, d.to_cluster) for d in r.displaced],
            )
    return conflicts, {d.edit_id for r in results for d in r.displaced}


@dataclass(frozen=True)
class WatchedRoutes:
    """Applied edits whose route a batch of new keys may change, and their blocks before."""

    edit_ids: tuple[str, ...]
    keys: F32  # (n, d) their prompt keys
    blocks: tuple[int | None, ...]


def _blocks(index: NeuronIndex, keys: F32) -> tuple[int | None, ...]:
    return tuple(None if r is None else r.block for r in index.query(keys))


def watch_routes(index: NeuronIndex, stored: KeyTable, fresh: Sequence[F32]) -> WatchedRoutes:
    """The ids in ``stored`` (edit id -> prompt key) within twice the radius of a ``fresh`` key.

    Call before inserting ``fresh``; ``rerouted`` then tells which of them moved.
    """
    empty = WatchedRoutes((), np.zeros((0, index.dim), np.float32), ())
    if not stored or not fresh:
        return empty
    ids = stored.ids()
    old_keys = stored.matrix()  # (N, d), a view of the table
    new_keys = np.stack(list(fresh))  # (K, d)
    sq = (
        (old_keys**2).sum(1)[:, None] + (new_keys**2).sum(1)[None, :] - 2.0 * old_keys @ new_keys.T
    )  # (N, K)
    near = np.nonzero((sq <= (2.0 * index.radius) ** 2 + 1e-6).any(axis=1))[0]
    if len(near) == 0:
        return empty
    keys = np.ascontiguousarray(old_keys[near])
    return WatchedRoutes(tuple(ids[i] for i in near.tolist()), keys, _blocks(index, keys))


def rerouted(index: NeuronIndex, watched: WatchedRoutes) -> set[str]:
    """The watched ids whose prompt now routes to another block (or none) in ``index``."""
    if not watched.edit_ids:
        return set()
    now = _blocks(index, watched.keys)
    return {e for e, a, b in zip(watched.edit_ids, watched.blocks, now, strict=True) if a != b}


def generation_failures(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    routing: Routing,
    specs: Sequence[EditSpec],
    *,
    batch_size: int,
) -> dict[str, str]:
    """Greedy-generate each spec's prompt under ``routing``; edit id -> text, failures only."""
    failures: dict[str, str] = {}
    for start in range(0, len(specs), batch_size):
        chunk = list(specs[start : start + batch_size])
        prompts = [s.prompt for s in chunk]
        longest = max(len(target_token_ids(tokenizer, s.prompt, s.target)) for s in chunk)
        with routing(prompts):
            texts = greedy_continuations(
                model, tokenizer, prompts, max_new_tokens=longest + 1, batch_size=len(prompts)
            )
        for spec, text in zip(chunk, texts, strict=True):
            if not continuation_matches(text, spec.target):
                failures[spec.edit_id] = text
    return failures
