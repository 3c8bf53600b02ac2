"""The subject gate's automatic floor: the pure rule on synthetic cosines, ``"auto"`` on
the micro world (resolved, logged, used by the gate, persisted) and the fallbacks."""

from __future__ import annotations

import shutil
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from daemon.config import HookConfig
from daemon.editors.hook import floor as fl
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.floor import FactLabel, floor_rule, pair_cosines, round_up
from daemon.editors.hook.gate import DEFAULT_SUBJECT_COS_FLOOR
from daemon.editors.hook.setup import (
    build_hook_editor,
    set_subject_floor,
    settings_from_config,
    world_floor_facts,
)
from daemon.model.loading import LoadedModel, load_model
from daemon.world.build import load_world
from tests.daemon.editors.hook.conftest import edit_specs, hook_config, prompt_logits

# --- the pure rule --------------------------------------------------------------------


def test_the_floor_is_the_negative_quantile_rounded_up() -> None:
    """0.98 quantile of 0..0.5 in 1,001 steps is 0.49: the floor is 0.49 (no float noise
    bumps it to 0.50), and 21 of the 1,001 negatives (0.49 to 0.50) reach it."""
    assert fl.NEG_QUANTILE == 0.98
    negatives = torch.linspace(0.0, 0.5, 1001, dtype=torch.float64)
    positives = torch.tensor([0.3, 0.6, 0.9, 0.95], dtype=torch.float64)
    evidence = floor_rule(negatives, positives)
    assert evidence is not None
    assert evidence.negative_quantile == pytest.approx(0.49)
    assert evidence.floor == 0.49
    assert (evidence.negatives, evidence.positives) == (1001, 4)
    assert evidence.positive_pass_rate == 0.75
    assert evidence.negative_pass_rate == pytest.approx(21 / 1001)


@pytest.mark.parametrize(
    ("value", "floor"),
    [(0.48, 0.48), (0.4801, 0.49), (0.7155, 0.72), (0.1, 0.40), (0.95, 0.80), (-0.3, 0.40)],
)
def test_the_floor_rounds_up_to_a_hundredth_and_is_clipped(value: float, floor: float) -> None:
    """An exact hundredth stays (no float noise bumps it); the result lies in [0.40, 0.80]."""
    evidence = floor_rule(torch.full((fl.MIN_PAIRS,), value), torch.zeros(0))
    assert evidence is not None
    assert evidence.floor == floor
    assert evidence.positive_pass_rate is None  # no positives


def test_round_up_ignores_representation_noise() -> None:
    assert [round_up(v) for v in (0.48, 0.57, 0.4801, 0.0, -0.304)] == [
        0.48,
        0.57,
        0.49,
        0.0,
        -0.3,
    ]


def test_too_few_negative_pairs_give_no_floor() -> None:
    assert floor_rule(torch.zeros(fl.MIN_PAIRS - 1), torch.ones(500)) is None
    assert floor_rule(torch.zeros(fl.MIN_PAIRS), torch.ones(500)) is not None


def test_pairs_are_same_subject_other_relation_and_same_fact_other_template() -> None:
    """Against a naive loop: subjects are never paired with each other."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen), dim=-1)
    labels = [
        FactLabel("A", "r1", 0),
        FactLabel("A", "r1", 1),
        FactLabel("A", "r2", 0),
        FactLabel("A", "r2", 1),
        FactLabel("A", "r2", 2),
        FactLabel("B", "r1", 0),
        FactLabel("C", "r1", 0),
    ]
    negatives, positives = pair_cosines(keys, labels)
    neg_ref, pos_ref = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i], labels[j]
            if a.subject != b.subject:
                continue
            cos = float(keys[i].double() @ keys[j].double())
            if a.relation != b.relation:
                neg_ref.append(cos)
            elif a.template != b.template:
                pos_ref.append(cos)
    assert (negatives.numel(), positives.numel()) == (6, 4)
    assert sorted(negatives.tolist()) == pytest.approx(sorted(neg_ref))
    assert sorted(positives.tolist()) == pytest.approx(sorted(pos_ref))
    with pytest.raises(ValueError, match="labels"):
        pair_cosines(keys[:3], labels)


# --- "auto" on a model -------------------------------------------------------------------


def _events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[dict[str, Any]]:
    return [dict(e) for e in logs if e["event"] == name]


def test_auto_settings_start_at_the_default() -> None:
    """``"auto"`` is resolved after the editor is built; the settings start at 0.55."""
    settings = settings_from_config(HookConfig(gate_subject_cos_floor="auto"), (1,), "prompt_last")
    assert settings.gate_subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR


def test_world_floor_facts_are_a_bounded_seeded_sample(micro_world: Path) -> None:
    world = load_world(str(micro_world))
    facts = world_floor_facts(world, max_subjects=5, max_prompts=60)
    assert 0 < len(facts) <= 60 and len({label.subject for label, _, _ in facts}) <= 5
    assert facts == world_floor_facts(world, max_subjects=5, max_prompts=60)
    for label, prompt, _ in facts:
        template = world.relation(label.relation).train_templates[label.template]
        assert prompt == template.replace("{subject}", label.subject)


@pytest.fixture
def auto_editor(loaded: LoadedModel, stats: Path) -> tuple[HookEditor, dict[str, Any]]:
    """A hook editor on the micro world with ``gate_subject_cos_floor = "auto"``, and the
    ``hook_floor_calibrated`` event it logged."""
    with capture_logs() as logs:
        editor = build_hook_editor(
            loaded, hook_config(gate_subject_cos_floor="auto"), stats_dir=stats
        )
    (event,) = _events(logs, "hook_floor_calibrated")
    return editor, event


def test_auto_calibrates_logs_and_exposes_the_floor(
    auto_editor: tuple[HookEditor, dict[str, Any]],
) -> None:
    editor, event = auto_editor
    floor = event["floor"]
    assert fl.FLOOR_MIN <= floor <= fl.FLOOR_MAX
    assert event["negatives"] >= fl.MIN_PAIRS and event["positives"] > 0
    assert 0.0 <= event["positive_pass_rate"] <= 1.0
    assert editor.settings.gate_subject_cos_floor == floor
    assert editor.health()["gate_subject_cos_floor"] == floor
    for hook in editor.hooks.values():
        assert hook.subject_floor == floor
        assert torch.equal(hook.subject_cos_floor, torch.tensor(floor, dtype=torch.float32))


def test_the_gate_follows_the_floor_buffer(
    auto_editor: tuple[HookEditor, dict[str, Any]], edits: list[dict[str, Any]]
) -> None:
    """The subject gate reads the buffer: raising it in place closes the gate (the
    cached candidate tables are rebuilt), restoring it reopens it."""
    editor, event = auto_editor
    prompts = [e["prompt"] for e in edits[:3]]
    base = prompt_logits(editor, prompts)
    assert all(o.accepted for o in editor.apply(edit_specs(edits[:3])))
    edited = prompt_logits(editor, prompts)
    assert not torch.equal(edited, base)
    set_subject_floor(editor, 1.0)  # no cosine passes it
    assert torch.equal(prompt_logits(editor, prompts), base)
    set_subject_floor(editor, event["floor"])
    assert torch.equal(prompt_logits(editor, prompts), edited)


def test_a_model_that_states_no_common_fact_keeps_the_default(
    micro_world: Path, tmp_path: Path, stats: Path
) -> None:
    """Without world.json the floor is calibrated on the shipped common facts the model
    states itself; the micro world's model states none of them."""
    plain = tmp_path / "plain"
    shutil.copytree(micro_world, plain, ignore=shutil.ignore_patterns("world.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(load_world(str(micro_world)).training_corpus()))
    config = hook_config(gate_subject_cos_floor="auto", covariance_source=str(corpus))
    with capture_logs() as logs:
        editor = build_hook_editor(load_model(str(plain), device="cpu"), config, stats_dir=stats)
    (known,) = _events(logs, "common_facts_known")
    assert known["known"] == 0 and known["facts"] > 200
    (event,) = _events(logs, "hook_floor_default")
    assert "no subject with facts under two relations" in event["reason"]
    assert event["floor"] == DEFAULT_SUBJECT_COS_FLOOR
    assert not _events(logs, "hook_floor_calibrated")
    assert editor.settings.gate_subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR
    assert all(h.subject_floor == DEFAULT_SUBJECT_COS_FLOOR for h in editor.hooks.values())


def test_the_key_gate_keeps_the_default(loaded: LoadedModel, stats: Path) -> None:
    config = hook_config(gate_subject_cos_floor="auto", gate_scope="key")
    with capture_logs() as logs:
        editor = build_hook_editor(loaded, config, stats_dir=stats)
    (event,) = _events(logs, "hook_floor_default")
    assert "gate_scope" in event["reason"]
    assert editor.settings.gate_subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR


# --- persistence -------------------------------------------------------------------------


def test_a_loaded_state_keeps_the_floor_it_was_saved_with(
    auto_editor: tuple[HookEditor, dict[str, Any]],
    edits: list[dict[str, Any]],
    micro_world: Path,
    stats: Path,
    tmp_path: Path,
) -> None:
    """Whatever the loading editor's own floor (configured or calibrated), the state's
    floor wins and the logits are the saved editor's, bit for bit."""
    editor, event = auto_editor
    assert all(o.accepted for o in editor.apply(edit_specs(edits[:4])))
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    expected = prompt_logits(editor, prompts)
    editor.save(tmp_path / "hook")
    other_floor = 0.3 if event["floor"] != 0.3 else 0.45
    fresh = load_model(str(micro_world), device="cpu")
    other = build_hook_editor(
        fresh, hook_config(gate_subject_cos_floor=other_floor), stats_dir=stats
    )
    assert other.settings.gate_subject_cos_floor == other_floor
    other.load(tmp_path / "hook")
    assert other.settings.gate_subject_cos_floor == event["floor"]
    assert other.health()["gate_subject_cos_floor"] == event["floor"]
    assert all(h.subject_floor == event["floor"] for h in other.hooks.values())
    assert torch.equal(prompt_logits(other, prompts), expected)


def test_a_state_without_a_floor_keeps_the_editors_own(
    auto_editor: tuple[HookEditor, dict[str, Any]],
    edits: list[dict[str, Any]],
    micro_world: Path,
    stats: Path,
) -> None:
    """States saved before the floor was persisted load with the editor's floor."""
    editor, _ = auto_editor
    assert all(o.accepted for o in editor.apply(edit_specs(edits[:2])))
    state = editor.state_dict()
    tensors = {k: v for k, v in state["tensors"].items() if not k.endswith(".subject_cos_floor")}
    assert len(tensors) == len(state["tensors"]) - len(editor.hooks)
    fresh = load_model(str(micro_world), device="cpu")
    other = build_hook_editor(fresh, hook_config(gate_subject_cos_floor=0.45), stats_dir=stats)
    other.load_state_dict({**state, "tensors": tensors})
    assert other.settings.gate_subject_cos_floor == 0.45
    assert all(h.subject_floor == 0.45 for h in other.hooks.values())
