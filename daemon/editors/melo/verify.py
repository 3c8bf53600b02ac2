"""The pieces of MELO's insert-and-verify transaction: add keys, find re-routed edits, verify.

``editor.MeloEditor._insert_verified`` runs them on the live neuron index inside an
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
from daemon.editors.melo.checks import edit_prompts
from daemon.editors.melo.index import AddResult, NeuronIndex
from daemon.editors.melo.keys import F32, KeyTable
from daemon.errors import EditConflictError
from daemon.model.answers import continuation_matches
from daemon.model.batches import target_token_ids
from daemon.model.generate import greedy_continuations

log = structlog.get_logger()

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]


def insert_keys(
    index: NeuronIndex,
    specs: Sequence[EditSpec],
    block: int,
    keys: Mapping[str, F32],
    label: Callable[[EditSpec], str] = lambda spec: spec.target,
    texts: Callable[[EditSpec], list[str]] = edit_prompts,
) -> tuple[dict[str, str], set[str]]:
    """Add each spec's keys under ``block``, clustered by ``label(spec)`` (the index's
    "target"); return (conflict reason per edit, displaced ids)."""
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
