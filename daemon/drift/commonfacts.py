"""General-knowledge facts shipped with editd, for calibrating editors on any model.

A fact world knows its own facts exactly; a real model does not come with a list
of what it knows. ``daemon/data/common-facts.json`` holds 224 facts written for
editd from common knowledge (capitals, continents, official languages and
currencies of 43 countries, the countries of 33 cities, 20 chemical symbols, the
founders of 12 companies), each relation under three templates. Countries carry up
to four relations, which gives the same-subject, other-relation pairs the subject
gate's floor is calibrated on.

:func:`load_common_facts` reads them as a :class:`~daemon.facts.FactSet`;
:func:`known_facts` keeps the facts a model states itself (its greedy continuation
of the first template starts with the answer), which is what locate traces and
what the floor is calibrated on; :func:`probe_prompts` gives every prompt for drift
validation, where only the base model's own distributions matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.errors import WorldFormatError
from daemon.facts import Fact, Relation, fill
from daemon.log import get_logger
from daemon.model.generate import greedy_continuations

log = get_logger(__name__)

DATA_FILE = "common-facts.json"
KIND = "common"


@dataclass(frozen=True)
class CommonFacts:
    """Facts and their relations' templates (every template counts as a training one)."""

    relations: tuple[Relation, ...]
    facts: tuple[Fact, ...]

    def relation(self, name: str) -> Relation:
        for rel in self.relations:
            if rel.name == name:
                return rel
        raise KeyError(name)

    def prompts(self, fact: Fact) -> list[str]:
        return [fill(t, fact.subject) for t in self.relation(fact.relation).train_templates]

    def only(self, facts: list[Fact]) -> CommonFacts:
        return CommonFacts(self.relations, tuple(facts))


def load_common_facts() -> CommonFacts:
    """The shipped facts (raises ``WorldFormatError`` if the file is damaged)."""
    text = (resources.files("daemon") / "data" / DATA_FILE).read_text("utf-8")
    try:
        data: dict[str, Any] = json.loads(text)
        relations = tuple(
            Relation(name, KIND, KIND, tuple(templates), ())
            for name, templates in data["relations"].items()
        )
        facts = tuple(Fact(str(s), str(r), str(o)) for s, r, o in data["facts"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WorldFormatError(f"{DATA_FILE}: {exc}") from exc
    names = {r.name for r in relations}
    unknown = sorted({f.relation for f in facts} - names)
    if unknown:
        raise WorldFormatError(f"{DATA_FILE}: facts name unknown relations {unknown}")
    return CommonFacts(relations, facts)


def known_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    bank: CommonFacts | None = None,
    *,
    batch_size: int = 32,
) -> CommonFacts:
    """The facts whose greedy continuation of their first template starts with the answer."""
    bank = bank or load_common_facts()
    prompts = [bank.prompts(f)[0] for f in bank.facts]
    longest = max(
        len(tokenizer(f.target, add_special_tokens=False)["input_ids"]) for f in bank.facts
    )
    answers = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=longest, batch_size=batch_size
    )
    kept = [
        f
        for f, answer in zip(bank.facts, answers, strict=True)
        if answer.strip().lower().startswith(f.object.lower())
    ]
    log.info("common_facts_known", known=len(kept), facts=len(bank.facts))
    return bank.only(kept)


def probe_prompts(bank: CommonFacts | None = None) -> list[str]:
    """Every fact under every template, in file order."""
    bank = bank or load_common_facts()
    return [p for f in bank.facts for p in bank.prompts(f)]
