"""Counterfactual edit sets: right types, right templates, base-model locality answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from daemon.errors import WorldError
from daemon.facts import fill
from daemon.model.generate import first_sentence, greedy_continuations
from daemon.world.build import load_world
from daemon.world.editsets import counterfactual_edits, probe_set, read_jsonl, write_jsonl
from daemon.world.evaluate import answer_budget
from daemon.world.facts import RELATIONS_BY_NAME, World

REQUEST_KEYS = {
    "id",
    "prompt",
    "target",
    "target_true",
    "subject",
    "relation",
    "rephrases",
    "heldout_rephrases",
    "locality",
    "source",
}


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> tuple[World, PreTrainedModel, Any]:
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    return load_world(micro_world), model, AutoTokenizer.from_pretrained(micro_world)


@pytest.fixture(scope="module")
def edits(loaded: tuple[World, PreTrainedModel, Any]) -> list[dict[str, Any]]:
    world, model, tok = loaded
    return counterfactual_edits(world, model, tok, 30, seed=0)


def _truth(world: World) -> dict[tuple[str, str], str]:
    return {(f.subject, f.relation): f.object for f in world.facts}


def test_edits_have_the_request_shape(edits: list[dict[str, Any]]) -> None:
    assert len(edits) == 30
    assert [e["id"] for e in edits] == [f"world-cf-{i:04d}" for i in range(1, 31)]
    for edit in edits:
        assert set(edit) == REQUEST_KEYS
        assert edit["subject"] in edit["prompt"]
        assert edit["target"].startswith(" ")
        assert edit["target_true"].startswith(" ") and edit["target_true"] != edit["target"]
        assert edit["source"]["kind"] == "eval"


def test_targets_are_new_objects_of_the_right_type(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any]
) -> None:
    world = loaded[0]
    truth = _truth(world)
    for edit in edits:
        new = edit["target"][1:]
        assert new != truth[(edit["subject"], edit["relation"])]
        assert new in world.objects(edit["relation"])


def test_rephrases_use_the_other_templates(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any]
) -> None:
    world = loaded[0]
    for edit in edits:
        rel = world.relation(edit["relation"])
        train = [fill(t, edit["subject"]) for t in rel.train_templates]
        assert edit["prompt"] in train
        assert sorted([edit["prompt"], *edit["rephrases"]]) == sorted(train)
        assert edit["heldout_rephrases"] == [
            fill(t, edit["subject"]) for t in rel.heldout_templates
        ]
        assert not set(edit["heldout_rephrases"]) & set(train)


def test_locality_answers_are_the_base_models_own(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any]
) -> None:
    world, model, tok = loaded
    probes = [p for e in edits for p in e["locality"]]
    assert len(probes) >= 2 * len(edits)
    outs = greedy_continuations(
        model, tok, [p["prompt"] for p in probes], max_new_tokens=answer_budget(tok, world)
    )
    assert [p["target"] for p in probes] == [first_sentence(o) for o in outs]
    for edit in edits:
        assert edit["prompt"] not in {p["prompt"] for p in edit["locality"]}


def test_locality_never_probes_a_fact_the_set_edits(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any]
) -> None:
    world = loaded[0]
    edited_prompts = set()
    for edit in edits:
        rel = world.relation(edit["relation"])
        edited_prompts |= {fill(t, edit["subject"]) for t in rel.train_templates}
    probes = {p["prompt"] for e in edits for p in e["locality"]}
    assert probes
    assert not probes & edited_prompts


def test_locality_answers_are_mostly_the_truth(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any]
) -> None:
    """The micro model knows its facts, so its answers are the world's objects."""
    world = loaded[0]
    objects = {" " + o for rel in world.relations for o in world.objects(rel.name)}
    probes = [p for e in edits for p in e["locality"]]
    assert sum(p["target"] in objects for p in probes) / len(probes) >= 0.95


def test_edit_sets_are_deterministic(
    edits: list[dict[str, Any]], loaded: tuple[World, PreTrainedModel, Any], micro_world: Path
) -> None:
    _, model, tok = loaded
    assert counterfactual_edits(micro_world, model, tok, 30, seed=0) == edits
    other = counterfactual_edits(loaded[0], model, tok, 30, seed=1)
    assert other != edits


def test_asking_for_too_many_edits_fails(loaded: tuple[World, PreTrainedModel, Any]) -> None:
    world, model, tok = loaded
    with pytest.raises(WorldError, match="qualify"):
        counterfactual_edits(world, model, tok, len(world.facts) + 1, require_known=False)
    with pytest.raises(WorldError, match="split"):
        counterfactual_edits(world, model, tok, 1, split="nope")


def test_probe_set_comes_from_the_probe_split(loaded: tuple[World, PreTrainedModel, Any]) -> None:
    world, model, tok = loaded
    probes = probe_set(world, model, tok, 20, seed=0)
    assert 18 <= len(probes) <= 20
    probe_subjects = {world.facts[i].subject for i in world.splits["probe"]}
    assert all(any(s in p["prompt"] for s in probe_subjects) for p in probes)


def test_jsonl_round_trip(edits: list[dict[str, Any]], tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sets" / "edits.jsonl", edits)
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(edits)
    assert read_jsonl(path) == edits


def test_several_splits_are_used_in_order_and_locality_avoids_every_edit(
    loaded: tuple[World, PreTrainedModel, Any],
) -> None:
    world, model, tok = loaded
    n_edit = len(world.splits["edit"])
    n = n_edit + 5
    edits = counterfactual_edits(world, model, tok, n, split=("edit", "probe"), require_known=False)
    index = {(f.subject, f.relation): i for i, f in enumerate(world.facts)}
    facts = [index[(e["subject"], e["relation"])] for e in edits]
    assert set(facts[:n_edit]) == set(world.splits["edit"])
    assert set(facts[n_edit:]) <= set(world.splits["probe"])
    edited_prompts = {
        fill(t, world.facts[i].subject)
        for i in facts
        for t in (
            *RELATIONS_BY_NAME[world.facts[i].relation].train_templates,
            *RELATIONS_BY_NAME[world.facts[i].relation].heldout_templates,
        )
    }
    localities = [p["prompt"] for e in edits for p in e["locality"]]
    assert localities
    assert not set(localities) & edited_prompts
