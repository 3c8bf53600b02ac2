"""The world generator is deterministic and keeps its invariants."""

from __future__ import annotations

import json

import pytest

from daemon.errors import WorldFormatError
from daemon.facts import fill
from daemon.world.facts import (
    HELDOUT_KINDS,
    RELATIONS,
    WORLD_SPECS,
    World,
    WorldSpec,
    generate_world,
)


@pytest.fixture(scope="module")
def micro() -> World:
    return generate_world(WORLD_SPECS["micro"], seed=0)


@pytest.fixture(scope="module")
def small() -> World:
    return generate_world(WORLD_SPECS["small"], seed=0)


def _names(world: World) -> list[str]:
    return [n for names in world.entities.values() for n in names]


def test_same_seed_gives_the_same_world(micro: World) -> None:
    """Generation is a pure function of spec and seed."""
    again = generate_world(WORLD_SPECS["micro"], seed=0)
    assert json.dumps(again.to_json()) == json.dumps(micro.to_json())


def test_another_seed_gives_another_world(micro: World) -> None:
    other = generate_world(WORLD_SPECS["micro"], seed=1)
    assert other.entities["person"] != micro.entities["person"]


def test_sizes_have_the_promised_fact_counts(micro: World, small: World) -> None:
    """micro has a few hundred facts, small at least 2,000."""
    assert 200 <= len(micro.facts) <= 300
    assert len(small.facts) >= 2000
    assert len(micro.facts) == micro.spec.n_facts
    assert len(small.facts) == small.spec.n_facts


@pytest.mark.parametrize("size", ["micro", "small"])
def test_names_are_unique_and_never_substrings(size: str, micro: World, small: World) -> None:
    """No entity or closed-set name contains another (compared case-insensitively)."""
    world = micro if size == "micro" else small
    names = [n.lower() for n in _names(world)]
    assert len(names) == len(set(names))
    ordered = sorted(names, key=len)
    for i, short in enumerate(ordered):
        assert not any(short in longer for longer in ordered[i + 1 :]), short


def test_subjects_occur_once_in_every_prompt(micro: World) -> None:
    """A subject never collides with template text, so it occurs exactly once."""
    for fact in micro.facts:
        rel = micro.relation(fact.relation)
        for template in (*rel.train_templates, *rel.heldout_templates):
            assert fill(template, fact.subject).count(fact.subject) == 1


def test_heldout_templates_are_disjoint_from_training() -> None:
    """Every relation has >= 2 held-out templates and >= 3 training ones, never shared."""
    assert len(RELATIONS) >= 8
    for rel in RELATIONS:
        assert len(rel.heldout_templates) >= 2
        assert len(rel.train_templates) >= 3
        assert not set(rel.heldout_templates) & set(rel.train_templates)
        for template in (*rel.train_templates, *rel.heldout_templates):
            assert template.count("{subject}") == 1
            assert not template.endswith(" ")


def test_no_template_is_a_prefix_of_another() -> None:
    """Otherwise a prompt would have two right continuations (an object and more words)."""
    templates = [t for r in RELATIONS for t in (*r.train_templates, *r.heldout_templates)]
    assert len(templates) == len(set(templates))
    for a in templates:
        assert not any(b != a and b.startswith(a) for b in templates), a


def test_first_heldout_template_uses_only_training_words() -> None:
    """The first held-out phrasing recombines training vocabulary; the second does not."""
    words = {w for r in RELATIONS for t in r.train_templates for w in t.replace("'s", " ").split()}
    assert HELDOUT_KINDS == ("recombined", "novel")
    for rel in RELATIONS:
        assert len(rel.heldout_templates) == len(HELDOUT_KINDS)
        recombined, novel = rel.heldout_templates
        assert set(recombined.replace("'s", " ").split()) <= words, recombined
        assert not set(novel.replace("'s", " ").split()) <= words, novel


def test_facts_respect_types_and_closed_sets(micro: World, small: World) -> None:
    for world in (micro, small):
        for fact in world.facts:
            rel = world.relation(fact.relation)
            assert fact.subject in world.entities[rel.subject_type]
            assert fact.object in world.objects(fact.relation)
            assert fact.target == " " + fact.object


def test_each_subject_has_each_of_its_relations_once(micro: World) -> None:
    pairs = [(f.subject, f.relation) for f in micro.facts]
    assert len(pairs) == len(set(pairs))
    for rel in RELATIONS:
        subjects = {f.subject for f in micro.facts if f.relation == rel.name}
        assert subjects == set(micro.entities[rel.subject_type])


def test_world_is_consistent(small: World) -> None:
    """A capital lies in its country; a CEO works for the company they lead."""
    truth = {(f.subject, f.relation): f.object for f in small.facts}
    for country in small.entities["country"]:
        assert truth[(truth[(country, "capital_of")], "located_in")] == country
    for company in small.entities["company"]:
        assert truth[(truth[(company, "ceo_of")], "works_for")] == company


def test_splits_partition_the_facts(micro: World) -> None:
    edit, probe = set(micro.splits["edit"]), set(micro.splits["probe"])
    assert not edit & probe
    assert edit | probe == set(range(len(micro.facts)))


def test_corpus_is_training_templates_only(micro: World) -> None:
    corpus = micro.training_corpus()
    assert len(corpus) == sum(len(micro.relation(f.relation).train_templates) for f in micro.facts)
    heldout_prompts = {p for p, _ in micro.heldout_examples()}
    assert not any(s.startswith(tuple(heldout_prompts)) for s in corpus[:200])
    assert all(s.endswith(".") for s in corpus)


def test_json_round_trip(micro: World) -> None:
    data = json.loads(json.dumps(micro.to_json()))
    assert data["version"] == 1
    back = World.from_json(data)
    assert back.to_json() == micro.to_json()
    assert back.facts == micro.facts


def test_unknown_version_is_refused(micro: World) -> None:
    data = micro.to_json()
    data["version"] = 99
    with pytest.raises(WorldFormatError, match="version"):
        World.from_json(data)


def test_malformed_json_is_refused(micro: World) -> None:
    data = micro.to_json()
    del data["facts"]
    with pytest.raises(WorldFormatError, match="malformed"):
        World.from_json(data)


def test_spec_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="n_cities"):
        WorldSpec(
            n_countries=5, n_cities=2, n_companies=3, n_people=10, n_languages=2, n_professions=3
        )
    with pytest.raises(ValueError, match="edit_fraction"):
        WorldSpec(
            n_countries=2,
            n_cities=4,
            n_companies=3,
            n_people=10,
            n_languages=2,
            n_professions=3,
            edit_fraction=1.0,
        )
