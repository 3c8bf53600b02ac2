"""Tracing recall: the facts and prompt pairs to trace, and the evidence of where a model recalls.

The measuring half of :mod:`daemon.editors.hook.locate`: facts come from a fact
world (``world_trace_facts``) or a JSONL file of edit requests
(``request_trace_facts``), are paired (``make_pairs``) and traced
(``trace_recall``) into a :class:`LocateEvidence`, which
:mod:`daemon.editors.hook.locate_choice` turns into a choice. The batches and
forward hooks that patch one hidden state live in :mod:`daemon.editors.hook.patching`.

Evidence: interchange interventions
-----------------------------------
Prompts are paired: same template, different subjects, different first answer
tokens (``make_pairs``). For a pair (A, B) the clean run of B is recorded; then A
is run again with ONE hidden state replaced by B's at the same kind of position
(A's subject last token gets B's subject last token, A's prompt last token gets B's
prompt last token) and one layer, at one of two sites:

- ``residual``: the decoder block's output (the whole residual stream there);
- ``mlp_out``: the output of the block's MLP output projection only.

The pair "moved" when A's greedy next token became B's first answer token. Per
site, position kind and layer the evidence holds the moved fraction and the mean
probability of B's token (a graded signal where nothing moves). All of it runs as
a few large left-padded batches: every (pair, site, kind, layer) is one row, and a
forward hook per block and per MLP projection patches only its own rows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import structlog
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.hook.patching import (
    KINDS,
    SITES,
    PositionKind,
    Site,
    TraceFact,
    capture_donor_states,
    patched_scores,
    prepare,
    recalled_tokens,
)
from daemon.errors import EditValidationError, LocateError
from daemon.facts import FactSet, fill
from daemon.model import arch
from daemon.model.batches import padding_id
from store.records import iter_jsonl

log = structlog.get_logger()

DEFAULT_MAX_PAIRS = 64
DEFAULT_MIN_PAIRS = 8
DEFAULT_BATCH_ROWS = 128


# --- facts and pairs -----------------------------------------------------------------


def _round_robin(groups: Sequence[Sequence[Any]], limit: int | None, turn: int = 1) -> list[Any]:
    """``turn`` items from each group in turn, so a prefix spreads over the groups."""
    out: list[Any] = []
    for r in range(0, max((len(g) for g in groups), default=0), turn):
        for group in groups:
            for item in group[r : r + turn]:
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
    return out


WORLD_FACTS_PER_TURN = 4
"""Facts a template contributes at a time: even a short prefix holds pairs (two per template)."""


def world_trace_facts(
    world: FactSet, *, limit: int | None = None, seed: int = 0
) -> list[TraceFact]:
    """Facts of a fact world under its TRAINING templates, spread over relations and templates.

    Each (relation, template) group is shuffled with its own seeded generator;
    groups are ordered template index first (so consecutive groups are different
    relations) and contribute ``WORLD_FACTS_PER_TURN`` facts in turn.
    """
    groups: list[list[TraceFact]] = []
    n_templates = max(len(r.train_templates) for r in world.relations)
    for t in range(n_templates):
        for rel in world.relations:
            if t >= len(rel.train_templates):
                continue
            order = [f for f in world.facts if f.relation == rel.name]
            random.Random(f"{seed}:{rel.name}:{t}").shuffle(order)
            template = rel.train_templates[t]
            groups.append(
                [TraceFact(fill(template, f.subject), f.subject, f.target) for f in order]
            )
    return _round_robin(groups, limit, WORLD_FACTS_PER_TURN)


def request_trace_facts(path: Path) -> tuple[list[TraceFact], list[str]]:
    """Facts from a JSONL file of edit requests: each prompt and rephrase holding the subject.

    Targets are ignored (they are the new facts); ``answer`` is left ``None``.
    Returns the facts and one line per record that could not be used.
    """
    facts: list[TraceFact] = []
    skipped: list[str] = []
    for lineno, item in iter_jsonl(path):
        if isinstance(item, EditValidationError):
            skipped.append(str(item))
            continue
        if not item.subject:
            skipped.append(f"{path}, record {lineno}: no subject (locate needs one)")
            continue
        needle = item.subject.strip()
        facts.extend(
            TraceFact(p, item.subject) for p in (item.prompt, *item.rephrases) if needle in p
        )
    return list(dict.fromkeys(facts)), skipped


def make_pairs(
    facts: Sequence[TraceFact], answer_tokens: Sequence[int], max_pairs: int
) -> list[tuple[int, int]]:
    """``(a, b)`` index pairs: same template, different subject and first answer token.

    Within a template group each fact is paired with the next one (cyclically)
    that differs from it; groups are interleaved so a prefix spans the templates.
    """
    groups: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        groups.setdefault(fact.template(), []).append(i)
    per_group: list[list[tuple[int, int]]] = []
    for members in groups.values():
        pairs: list[tuple[int, int]] = []
        for j, a in enumerate(members):
            for step in range(1, len(members)):
                b = members[(j + step) % len(members)]
                differs = facts[a].subject.strip() != facts[b].subject.strip()
                if differs and answer_tokens[a] != answer_tokens[b]:
                    pairs.append((a, b))
                    break
        per_group.append(pairs)
    return _round_robin(per_group, max_pairs)


# --- evidence ------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceScores:
    """Per layer: the fraction of pairs moved to B's answer, and B's mean probability."""

    moved: tuple[float, ...]
    donor_prob: tuple[float, ...]


@dataclass(frozen=True)
class LocateEvidence:
    """What ``trace_recall`` measured; ``scores[site][kind]`` covers every layer."""

    n_layers: int
    n_pairs: int
    n_facts: int  # distinct facts offered
    n_recalled: int  # of which the model answers correctly
    n_templates: int  # templates the pairs come from
    baseline_donor_prob: float  # B's answer probability on A, unpatched
    scores: Mapping[Site, Mapping[PositionKind, TraceScores]]

    def layer_scores(self, kind: PositionKind) -> tuple[float, ...]:
        """The per-layer score the layer choice ranks by: ``mlp_out`` moved fraction."""
        return self.scores["mlp_out"][kind].moved

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "scores"}
        out["scores"] = {
            s: {k: {f: list(v) for f, v in asdict(t).items()} for k, t in by_kind.items()}
            for s, by_kind in self.scores.items()
        }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateEvidence:
        scores = {
            s: {
                k: TraceScores(
                    tuple(float(x) for x in data["scores"][s][k]["moved"]),
                    tuple(float(x) for x in data["scores"][s][k]["donor_prob"]),
                )
                for k in KINDS
            }
            for s in SITES
        }
        fields = ("n_layers", "n_pairs", "n_facts", "n_recalled", "n_templates")
        ints = {f: int(data[f]) for f in fields}
        lengths = {len(t.moved) for by_kind in scores.values() for t in by_kind.values()}
        lengths |= {len(t.donor_prob) for by_kind in scores.values() for t in by_kind.values()}
        if lengths != {ints["n_layers"]}:
            raise ValueError(f"per-layer scores do not have n_layers={ints['n_layers']} entries")
        return cls(**ints, baseline_donor_prob=float(data["baseline_donor_prob"]), scores=scores)


@torch.no_grad()
def trace_recall(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[TraceFact],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> LocateEvidence:
    """Interchange-intervention evidence of where ``model`` recalls ``facts`` (module doc).

    ``batch_rows`` bounds the rows of one forward pass (one row per pair and
    patch). Raises ``LocateError`` when fewer than ``min(min_pairs, max_pairs)``
    pairs can be formed from the facts the model recalls.
    """
    start = time.perf_counter()
    was_training = model.training
    model.train(False)
    try:
        evidence = _measure(model, tokenizer, facts, max_pairs, min_pairs, batch_rows)
    finally:
        model.train(was_training)
    log.info(
        "recall_traced",
        pairs=evidence.n_pairs,
        facts=evidence.n_facts,
        recalled=evidence.n_recalled,
        seconds=round(time.perf_counter() - start, 3),
    )
    return evidence


def _measure(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[TraceFact],
    max_pairs: int,
    min_pairs: int,
    batch_rows: int,
) -> LocateEvidence:
    prep = prepare(tokenizer, facts)
    tokens = recalled_tokens(model, tokenizer, prep, batch_rows)
    keep = [i for i, t in enumerate(tokens) if t is not None]
    recalled = prep.subset(keep)
    answer = [cast(int, tokens[i]) for i in keep]
    pairs = make_pairs(recalled.facts, answer, max_pairs)
    need = max(1, min(min_pairs, max_pairs))
    if len(pairs) < need:
        raise LocateError(
            f"only {len(pairs)} usable prompt pairs (need {need}): of {len(prep.facts)} "
            f"facts the model recalls {len(keep)}, and a pair needs two of them under the "
            "same template with different subjects and answers",
            pairs=len(pairs),
            facts=len(prep.facts),
            recalled=len(keep),
        )
    pad = padding_id(tokenizer)
    donors = sorted({b for _, b in pairs})
    slot = {b: i for i, b in enumerate(donors)}
    states = capture_donor_states(model, recalled.subset(donors), pad, batch_rows)
    slots = [slot[b] for _, b in pairs]
    moved, prob, base = patched_scores(
        model, recalled, pairs, answer, states, slots, pad, batch_rows
    )
    return LocateEvidence(
        n_layers=arch.num_layers(model),
        n_pairs=len(pairs),
        n_facts=len(prep.facts),
        n_recalled=len(keep),
        n_templates=len({recalled.facts[a].template() for a, _ in pairs}),
        baseline_donor_prob=base,
        scores={
            s: {
                k: TraceScores(tuple(moved[si, ki].tolist()), tuple(prob[si, ki].tolist()))
                for ki, k in enumerate(KINDS)
            }
            for si, s in enumerate(SITES)
        },
    )
