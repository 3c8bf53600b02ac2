"""The pieces of MELO's insert-and-verify transaction: add keys, find re-routed edits, verify.

``editor.MeloEditor._insert_verified`` runs them on a copy of the neuron index:

* ``insert_keys`` adds each edit's keys (prompt and rephrases) and reports the
  edits refused for an identical-key conflict and the edits whose keys a split
  displaced (logged as ``melo_keys_displaced``).
* ``rerouted`` finds applied edits whose prompt now routes differently: a new
  cluster can open nearer to an applied key than its own cluster's centre, a
  split can shrink its cluster. Only prompts within twice the radius of a new
  key can be affected (a new centre must come within one radius of them, a
  split cluster spans two), so only those are queried, before and after.
* ``generation_failures`` is the verification itself: real greedy generation
  under the editor's routing, judged by ``continuation_matches`` (the same rule
  the evaluation uses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import numpy as np
import structlog
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import EditSpec
from daemon.editors.melo.checks import edit_prompts
from daemon.editors.melo.index import NeuronIndex
from daemon.editors.melo.index_records import AddResult
from daemon.editors.melo.keys import F32
from daemon.errors import EditConflictError
from daemon.eval.metrics import continuation_matches
from daemon.model.batches import target_token_ids
from daemon.model.generate import greedy_continuations

log = structlog.get_logger()

Routing = Callable[[Sequence[str]], AbstractContextManager[None]]


def insert_keys(
    index: NeuronIndex, specs: Sequence[EditSpec], block: int, keys: Mapping[str, F32]
) -> tuple[dict[str, str], set[str]]:
    """Add each spec's keys under ``block``; return (conflict reason per edit, displaced ids)."""
    conflicts: dict[str, str] = {}
    results: list[AddResult] = []
    for spec in specs:
        texts = edit_prompts(spec)
        try:
            results.extend(
                index.add_batch(
                    [spec.edit_id] * len(texts),
                    np.stack([keys[t] for t in texts]),
                    [spec.target] * len(texts),
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


def rerouted(
    before: NeuronIndex,
    after: NeuronIndex,
    stored: Mapping[str, F32],
    fresh: Sequence[F32],
) -> set[str]:
    """Ids in ``stored`` (edit id -> prompt key) whose route differs between the indexes."""
    if not stored or not fresh:
        return set()
    ids = list(stored)
    old_keys = np.stack([stored[e] for e in ids])  # (N, d)
    new_keys = np.stack(list(fresh))  # (K, d)
    sq = (
        (old_keys**2).sum(1)[:, None] + (new_keys**2).sum(1)[None, :] - 2.0 * old_keys @ new_keys.T
    )  # (N, K)
    near = np.nonzero((sq <= (2.0 * before.radius) ** 2 + 1e-6).any(axis=1))[0]
    if len(near) == 0:
        return set()
    was = [None if r is None else r.block for r in before.query(old_keys[near])]
    now = [None if r is None else r.block for r in after.query(old_keys[near])]
    return {ids[i] for i, a, b in zip(near.tolist(), was, now, strict=True) if a != b}


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
