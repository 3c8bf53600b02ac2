"""A deterministic synthetic knowledge base: invented entities, relations, templates.

Everything here is pure Python and seeded (``random.Random(seed)``): the same
``WorldSpec`` and seed always give the same ``World``, byte for byte in JSON.

Entities have invented names (unique; compared case-insensitively, no name is
a substring of another name, of a closed-set object or of a template). Each
relation maps a subject type to an object type whose members form the closed
set of answers. Every relation has several training templates and two held-out
templates that the model never sees in training: the first recombines words
the training templates use into a new phrasing (``"{subject}'s capital city
is"``), the second uses words the corpus never contains (``"{subject} is
governed from"``), which a model trained from scratch cannot be expected to
understand. No template is a prefix of another. A template is a prompt that
ends just before the object; targets carry a leading space (``" Velmora"``),
as edit targets do.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon.errors import WorldFormatError
from daemon.facts import SUBJECT_SLOT, Fact, Relation, fill
from daemon.world.names import NameBook

WORLD_FORMAT_VERSION = 1
# Bump whenever the generator's output for a given spec and seed changes.
GENERATOR_VERSION = 1

PERSON, COMPANY, CITY, COUNTRY = "person", "company", "city", "country"
PROFESSION, LANGUAGE = "profession", "language"
ENTITY_TYPES = (PERSON, COMPANY, CITY, COUNTRY, PROFESSION, LANGUAGE)


_S = SUBJECT_SLOT
RELATIONS: tuple[Relation, ...] = (
    Relation(
        "born_in",
        PERSON,
        CITY,
        (
            f"{_S} was born in",
            f"The birthplace of {_S} is",
            f"{_S} is a native of",
            f"{_S}'s place of birth is",
        ),
        (f"The place of birth of {_S} is", f"{_S} came into the world in"),
    ),
    Relation(
        "works_for",
        PERSON,
        COMPANY,
        (
            f"{_S} works for",
            f"{_S} is employed by",
            f"The employer of {_S} is",
            f"{_S} has a job at",
        ),
        (f"{_S}'s employer is", f"{_S} earns a salary from"),
    ),
    Relation(
        "profession",
        PERSON,
        PROFESSION,
        (
            f"{_S} works as a",
            f"The profession of {_S} is",
            f"By trade, {_S} is a",
            f"{_S}'s occupation is",
        ),
        (f"{_S}'s profession is", f"{_S} makes a living as a"),
    ),
    Relation(
        "headquartered_in",
        COMPANY,
        CITY,
        (
            f"{_S} is headquartered in",
            f"The headquarters of {_S} are in",
            f"{_S} has its head office in",
            f"{_S} is based in",
        ),
        (f"The head office of {_S} is in", f"{_S} runs its business from"),
    ),
    Relation(
        "ceo_of",
        COMPANY,
        PERSON,
        (
            f"The chief executive of {_S} is",
            f"{_S}'s CEO is",
            f"{_S} is led by",
            f"The CEO of {_S} is",
        ),
        (f"{_S}'s chief executive is", f"{_S} is headed by"),
    ),
    Relation(
        "located_in",
        CITY,
        COUNTRY,
        (
            f"{_S} is located in",
            f"{_S} is a city in",
            f"{_S} lies in the country of",
            f"The country where {_S} lies is",
        ),
        (f"{_S} is a city located in", f"{_S} can be found in"),
    ),
    Relation(
        "capital_of",
        COUNTRY,
        CITY,
        (
            f"The capital of {_S} is",
            f"{_S}'s capital is",
            f"The capital city of {_S} is",
            f"{_S} has its capital in",
        ),
        (f"{_S}'s capital city is", f"{_S} is governed from"),
    ),
    Relation(
        "language",
        COUNTRY,
        LANGUAGE,
        (
            f"The official language of {_S} is",
            f"People in {_S} speak",
            f"The language of {_S} is",
            f"In {_S}, people speak",
        ),
        (f"{_S}'s official language is", f"The main tongue spoken in {_S} is"),
    ),
)
RELATIONS_BY_NAME = {r.name: r for r in RELATIONS}
# What each held-out template position tests (see the module doc).
HELDOUT_KINDS = ("recombined", "novel")

# fmt: off
PROFESSIONS = (
    "baker", "dentist", "pilot", "lawyer", "nurse", "farmer", "painter", "teacher",
    "sailor", "tailor", "plumber", "carpenter", "chemist", "banker", "poet", "judge",
)
# fmt: on


@dataclass(frozen=True)
class WorldSpec:
    """How many entities of each kind a world has (facts follow from these counts)."""

    n_countries: int
    n_cities: int
    n_companies: int
    n_people: int
    n_languages: int
    n_professions: int
    edit_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.n_countries < 2 or self.n_languages < 2 or self.n_professions < 2:
            raise ValueError("n_countries, n_languages and n_professions must be >= 2")
        if self.n_cities < self.n_countries:
            raise ValueError("n_cities must be >= n_countries (every country has a capital)")
        if self.n_people < self.n_companies or self.n_companies < 2:
            raise ValueError("n_companies must be >= 2 and n_people >= n_companies (CEOs)")
        if self.n_professions > len(PROFESSIONS):
            raise ValueError(f"n_professions must be <= {len(PROFESSIONS)}")
        if not 0.0 < self.edit_fraction < 1.0:
            raise ValueError("edit_fraction must be in (0, 1)")

    @property
    def n_facts(self) -> int:
        """3 facts per person, 2 per company and per country, 1 per city."""
        return 3 * self.n_people + 2 * self.n_companies + self.n_cities + 2 * self.n_countries


WORLD_SPECS: dict[str, WorldSpec] = {
    "micro": WorldSpec(
        n_countries=6, n_cities=24, n_companies=16, n_people=50, n_languages=4, n_professions=10
    ),
    "small": WorldSpec(
        n_countries=24, n_cities=180, n_companies=150, n_people=520, n_languages=8, n_professions=16
    ),
    # About 12,600 facts, 80% in the edit split: 10,000 sequential edits from the edit
    # split alone, with about 2,500 facts left for locality probes.
    "medium": WorldSpec(
        n_countries=40,
        n_cities=900,
        n_companies=700,
        n_people=3400,
        n_languages=12,
        n_professions=16,
        edit_fraction=0.8,
    ),
}


@dataclass(frozen=True)
class World:
    """A generated world: entities by type, facts, per-relation templates and fact splits."""

    spec: WorldSpec
    seed: int
    entities: dict[str, tuple[str, ...]]
    facts: tuple[Fact, ...]
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def relations(self) -> tuple[Relation, ...]:
        return RELATIONS

    def relation(self, name: str) -> Relation:
        return RELATIONS_BY_NAME[name]

    def objects(self, relation: str) -> tuple[str, ...]:
        """The closed set of possible objects of ``relation``."""
        return self.entities[RELATIONS_BY_NAME[relation].object_type]

    def facts_about(self, subject: str) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject]

    def training_examples(self) -> list[tuple[str, str]]:
        """(prompt, target) for every fact under every training template."""
        return list(_examples(self.facts, heldout=False))

    def heldout_examples(self) -> list[tuple[str, str]]:
        """(prompt, target) for every fact under every held-out template."""
        return list(_examples(self.facts, heldout=True))

    def training_corpus(self) -> list[str]:
        """The sentences a model is trained on: training-template prompt + target + '.'."""
        return [p + t + "." for p, t in self.training_examples()]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": WORLD_FORMAT_VERSION,
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "spec": asdict(self.spec),
            "entities": {k: list(v) for k, v in self.entities.items()},
            "relations": [_relation_json(r) for r in RELATIONS],
            "facts": [asdict(f) for f in self.facts],
            "splits": {k: list(v) for k, v in self.splits.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        version = data.get("version")
        if version != WORLD_FORMAT_VERSION:
            raise WorldFormatError(
                f"unsupported world format version {version!r} "
                f"(this code reads {WORLD_FORMAT_VERSION})",
                version=version,
            )
        try:
            return cls(
                spec=WorldSpec(**data["spec"]),
                seed=int(data["seed"]),
                entities={k: tuple(v) for k, v in data["entities"].items()},
                facts=tuple(Fact(**f) for f in data["facts"]),
                splits={k: tuple(v) for k, v in data["splits"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WorldFormatError(f"malformed world data: {exc!r}") from exc


def _examples(facts: Iterable[Fact], *, heldout: bool) -> Iterator[tuple[str, str]]:
    for fact in facts:
        rel = RELATIONS_BY_NAME[fact.relation]
        for template in rel.heldout_templates if heldout else rel.train_templates:
            yield fill(template, fact.subject), fact.target


def _relation_json(rel: Relation) -> dict[str, Any]:
    return {
        "name": rel.name,
        "subject_type": rel.subject_type,
        "object_type": rel.object_type,
        "train_templates": list(rel.train_templates),
        "heldout_templates": list(rel.heldout_templates),
    }


# --- names ---------------------------------------------------------------------------

_SUFFIXES = {
    CITY: ("ford", "mouth", "burg", "vale", "port", "haven", "wick", "grad", "ora"),
    COUNTRY: ("ia", "land", "stan", "mark", "ovia", "onia"),
    COMPANY: ("corp", "tek", "ware", "dyne", "lux", "soft", "works", "gen"),
    LANGUAGE: ("ish", "ic", "ese", "ian"),
}


def _template_text() -> list[str]:
    return [fill(t, "") for r in RELATIONS for t in (*r.train_templates, *r.heldout_templates)]


def _names(spec: WorldSpec, rng: random.Random) -> dict[str, tuple[str, ...]]:
    book = NameBook(rng, reserved=_template_text(), taken=PROFESSIONS)

    def many(n: int, syl: tuple[int, int], kind: str) -> tuple[str, ...]:
        return tuple(book.new(lambda: book.word(syl, _SUFFIXES[kind])) for _ in range(n))

    def person() -> str:
        return f"{book.word((1, 2))} {book.word((2, 2))}"

    return {
        COUNTRY: many(spec.n_countries, (1, 2), COUNTRY),
        CITY: many(spec.n_cities, (1, 2), CITY),
        COMPANY: many(spec.n_companies, (1, 2), COMPANY),
        LANGUAGE: many(spec.n_languages, (1, 2), LANGUAGE),
        PERSON: tuple(book.new(person) for _ in range(spec.n_people)),
        PROFESSION: PROFESSIONS[: spec.n_professions],
    }


# --- facts ---------------------------------------------------------------------------


def _geography(ents: dict[str, tuple[str, ...]], rng: random.Random) -> list[Fact]:
    countries, cities = ents[COUNTRY], ents[CITY]
    langs = list(ents[LANGUAGE])
    home = [countries[i % len(countries)] for i in range(len(cities))]
    rng.shuffle(home)
    facts = [Fact(city, "located_in", country) for city, country in zip(cities, home, strict=True)]
    for i, country in enumerate(countries):
        own = [c for c, h in zip(cities, home, strict=True) if h == country]
        facts.append(Fact(country, "capital_of", rng.choice(own)))
        lang = langs[i] if i < len(langs) else rng.choice(langs)
        facts.append(Fact(country, "language", lang))
    return facts


def _economy(ents: dict[str, tuple[str, ...]], rng: random.Random) -> list[Fact]:
    companies, people = ents[COMPANY], ents[PERSON]
    ceos = rng.sample(people, len(companies))
    employer = dict(zip(ceos, companies, strict=True))
    facts: list[Fact] = []
    for company, ceo in zip(companies, ceos, strict=True):
        facts.append(Fact(company, "headquartered_in", rng.choice(ents[CITY])))
        facts.append(Fact(company, "ceo_of", ceo))
    for person in people:
        facts.append(Fact(person, "born_in", rng.choice(ents[CITY])))
        facts.append(Fact(person, "works_for", employer.get(person) or rng.choice(companies)))
        facts.append(Fact(person, "profession", rng.choice(ents[PROFESSION])))
    return facts


def generate_world(spec: WorldSpec, seed: int = 0) -> World:
    """The world for ``spec`` and ``seed``; deterministic."""
    rng = random.Random(f"editd-world-{GENERATOR_VERSION}-{seed}")
    entities = _names(spec, rng)
    facts = tuple(_geography(entities, rng) + _economy(entities, rng))
    order = list(range(len(facts)))
    rng.shuffle(order)
    cut = round(len(order) * spec.edit_fraction)
    splits = {"edit": tuple(sorted(order[:cut])), "probe": tuple(sorted(order[cut:]))}
    return World(spec=spec, seed=seed, entities=entities, facts=facts, splits=splits)
