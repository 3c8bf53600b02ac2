"""Counterfactual edit sets drawn from a fact world, in the editd request format.

Each edit changes one fact the base model knows to another object of the same
type (the relation's closed set). Its ``prompt`` uses one training template
chosen at random; ``rephrases`` are the relation's other training templates;
``heldout_rephrases`` the held-out templates (for evaluation only).

Locality probes are prompts the edit should not change: other subjects under
the same relation and template, and the same subject under its other
relations, never a fact that any edit of the same set changes (or a probe would
score another edit's success as a locality failure). Their ``target`` is the
*base model's* answer, not the world's truth: the greedy continuation
(``answer_budget`` new tokens, stopping at eos)
cut before its first sentence end (``.``, ``!``, ``?`` or newline) and
right-stripped. For a fact the model knows that is exactly the object with its
leading space (``" Velmora"``). Probes whose cut answer is empty are dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.drift.probes import Probe, unique_probes
from daemon.errors import WorldError
from daemon.facts import Fact, fill
from daemon.model.answers import continuation_matches
from daemon.model.generate import first_sentence, greedy_continuations
from daemon.world.evaluate import answer_budget
from daemon.world.facts import RELATIONS_BY_NAME, World

EDIT_ID_PREFIX = "world-cf-"


@dataclass(frozen=True)
class _Plan:
    """One edit before the base model's locality answers are known."""

    index: int
    fact: Fact
    template: str
    new_object: str
    locality_prompts: tuple[str, ...]


def counterfactual_edits(
    world: World | Path | str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    *,
    seed: int = 0,
    split: str | Sequence[str] = "edit",
    same_relation: int = 2,
    same_subject: int = 2,
    require_known: bool = True,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """``n`` counterfactual edit requests (ids ``world-cf-0001``...), deterministic in seed.

    ``world`` is a ``World`` or a built world folder. Facts come from the world's
    ``split`` (``"edit"`` by default), or from several splits in the order given
    (each shuffled on its own, so ``("edit", "probe")`` uses probe-split facts only
    past the edit split's); with ``require_known`` only facts whose main prompt the
    base model answers correctly are used. Locality probes never touch a fact the
    set edits, whichever split it came from. Raises ``WorldError`` when fewer than
    ``n`` facts qualify.
    """
    w = _as_world(world)
    splits = (split,) if isinstance(split, str) else tuple(split)
    unknown = [s for s in splits if s not in w.splits]
    if unknown or not splits:
        raise WorldError(f"unknown split {unknown!r} (expected one of {sorted(w.splits)})")
    rng = random.Random(f"editd-counterfactual-{seed}")
    order: list[int] = []
    for name in splits:
        part = list(w.splits[name])
        rng.shuffle(part)
        order += part
    budget = answer_budget(tokenizer, w)
    templates = {
        i: rng.choice(RELATIONS_BY_NAME[w.facts[i].relation].train_templates) for i in order
    }
    if require_known:
        order = _known(w, model, tokenizer, order, templates, budget, batch_size)
    if len(order) < n:
        raise WorldError(f"only {len(order)} facts qualify for counterfactual edits, asked for {n}")
    chosen = order[:n]
    edited = {(w.facts[i].subject, w.facts[i].relation) for i in chosen}
    plans = [_plan(w, i, templates[i], rng, same_relation, same_subject, edited) for i in chosen]
    prompts = [p for plan in plans for p in plan.locality_prompts]
    outs = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size
    )
    answers = dict(zip(prompts, (first_sentence(o) for o in outs), strict=True))
    return [_request(k, plan, answers) for k, plan in enumerate(plans, start=1)]


def _as_world(world: World | Path | str) -> World:
    if isinstance(world, World):
        return world
    from daemon.world.build import load_world

    return load_world(world)


def _known(
    world: World,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    order: list[int],
    templates: dict[int, str],
    budget: int,
    batch_size: int,
) -> list[int]:
    prompts = [fill(templates[i], world.facts[i].subject) for i in order]
    outs = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size
    )
    return [
        i
        for i, o in zip(order, outs, strict=True)
        if continuation_matches(o, world.facts[i].target)
    ]


def _plan(
    world: World,
    index: int,
    template: str,
    rng: random.Random,
    same_relation: int,
    same_subject: int,
    edited: set[tuple[str, str]],
) -> _Plan:
    fact = world.facts[index]
    new_object = rng.choice([o for o in world.objects(fact.relation) if o != fact.object])
    others = sorted(
        {
            f.subject
            for f in world.facts
            if f.relation == fact.relation
            and f.subject != fact.subject
            and (f.subject, f.relation) not in edited
        }
    )
    prompts = [fill(template, s) for s in rng.sample(others, min(same_relation, len(others)))]
    own = [
        f
        for f in world.facts_about(fact.subject)
        if f.relation != fact.relation and (f.subject, f.relation) not in edited
    ]
    for other in rng.sample(own, min(same_subject, len(own))):
        rel = RELATIONS_BY_NAME[other.relation]
        prompts.append(fill(rng.choice(rel.train_templates), other.subject))
    return _Plan(index, fact, template, new_object, tuple(prompts))


def _request(number: int, plan: _Plan, answers: dict[str, str]) -> dict[str, Any]:
    fact, rel = plan.fact, RELATIONS_BY_NAME[plan.fact.relation]
    return {
        "id": f"{EDIT_ID_PREFIX}{number:04d}",
        "prompt": fill(plan.template, fact.subject),
        "target": " " + plan.new_object,
        "target_true": fact.target,
        "subject": fact.subject,
        "relation": fact.relation,
        "rephrases": [fill(t, fact.subject) for t in rel.train_templates if t != plan.template],
        "heldout_rephrases": [fill(t, fact.subject) for t in rel.heldout_templates],
        "locality": [
            {"prompt": p, "target": answers[p]} for p in plan.locality_prompts if answers[p]
        ],
        "source": {"kind": "eval", "item_id": f"fact-{plan.index}"},
    }


def probe_prompts(world: World, n: int, *, seed: int = 0, split: str = "probe") -> list[str]:
    """``n`` prompts (fewer if the split is smaller) of facts of ``split``, each under a
    training template drawn with ``seed``: :func:`probe_set`'s prompts, in its order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if split not in world.splits:
        raise WorldError(f"unknown split {split!r} (expected one of {sorted(world.splits)})")
    rng = random.Random(f"editd-probes-{seed}")
    chosen = rng.sample(list(world.splits[split]), min(n, len(world.splits[split])))
    return [
        fill(
            rng.choice(RELATIONS_BY_NAME[world.facts[i].relation].train_templates),
            world.facts[i].subject,
        )
        for i in chosen
    ]


def probes_from_world(
    world: World | Path | str, n: int = 200, *, seed: int = 0, split: str = "probe"
) -> list[Probe]:
    """Drift probes from a fact world (a ``World`` or a built folder): the prompts of
    :func:`probe_prompts`, each once."""
    return unique_probes(probe_prompts(_as_world(world), n, seed=seed, split=split))


def probe_set(
    world: World | Path | str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    *,
    seed: int = 0,
    split: str = "probe",
    batch_size: int = 64,
) -> list[dict[str, str]]:
    """``n`` ``{prompt, target}`` probes from ``split`` with the base model's answers.

    Prompts use training templates; targets follow the locality rule above. Meant
    as a default drift probe set disjoint from the edit split's facts.
    """
    w = _as_world(world)
    prompts = probe_prompts(w, n, seed=seed, split=split)
    outs = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=answer_budget(tokenizer, w), batch_size=batch_size
    )
    return [
        {"prompt": p, "target": first_sentence(o)}
        for p, o in zip(prompts, outs, strict=True)
        if first_sentence(o)
    ]


def write_jsonl(path: Path | str, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8); creates parent folders. Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped)."""
    lines: Sequence[str] = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
