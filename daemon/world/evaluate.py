"""How well a model knows a world: greedy exact match on template prompts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.facts import fill
from daemon.model.answers import continuation_matches
from daemon.model.generate import greedy_continuations
from daemon.world.facts import HELDOUT_KINDS, RELATIONS_BY_NAME, World
from daemon.world.tokenizer import token_length


@dataclass(frozen=True)
class WorldAccuracy:
    """Greedy exact-match accuracy on training- and held-out-template prompts."""

    train: float
    heldout: float
    train_by_relation: dict[str, float]
    heldout_by_relation: dict[str, float]
    heldout_by_kind: dict[str, float]  # "recombined" (first held-out template), "novel"


def answer_budget(tokenizer: PreTrainedTokenizerBase, world: World) -> int:
    """New tokens enough for any object of the world plus one token after it."""
    objects = {f.target for f in world.facts}
    for rel in world.relations:
        objects.update(" " + o for o in world.objects(rel.name))
    return max(token_length(tokenizer, o) for o in objects) + 1


def evaluate_world(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    world: World,
    *,
    batch_size: int = 128,
) -> WorldAccuracy:
    """Score every fact under every training and every held-out template."""
    budget = answer_budget(tokenizer, world)
    train = _score(model, tokenizer, world, heldout=False, budget=budget, batch_size=batch_size)
    held = _score(model, tokenizer, world, heldout=True, budget=budget, batch_size=batch_size)
    return WorldAccuracy(
        train=_mean([ok for _, _, ok in train]),
        heldout=_mean([ok for _, _, ok in held]),
        train_by_relation=_grouped((rel, ok) for rel, _, ok in train),
        heldout_by_relation=_grouped((rel, ok) for rel, _, ok in held),
        heldout_by_kind=_grouped((HELDOUT_KINDS[i], ok) for _, i, ok in held),
    )


def _score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    world: World,
    *,
    heldout: bool,
    budget: int,
    batch_size: int,
) -> list[tuple[str, int, bool]]:
    """(relation, template index, exact match) for every fact under every template."""
    rows: list[tuple[str, int, str, str]] = []  # (relation, template index, prompt, target)
    for fact in world.facts:
        rel = RELATIONS_BY_NAME[fact.relation]
        templates = rel.heldout_templates if heldout else rel.train_templates
        for i, template in enumerate(templates):
            rows.append((fact.relation, i, fill(template, fact.subject), fact.target))
    prompts = [row[2] for row in rows]
    outs = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size
    )
    return [(r, i, continuation_matches(o, t)) for (r, i, _, t), o in zip(rows, outs, strict=True)]


def _mean(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def _grouped(pairs: Iterable[tuple[str, bool]]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for key, ok in pairs:
        groups[key].append(ok)
    return {key: round(_mean(hits), 4) for key, hits in sorted(groups.items())}
