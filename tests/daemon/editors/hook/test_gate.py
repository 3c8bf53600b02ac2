"""The gate: subject n-grams, the index, scope at prefill and decode, routing; the subject
gate's automatic floor: the pure rule on synthetic cosines, ``"auto"`` on the micro world
(resolved, logged, used by the gate, persisted) and the fallbacks."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from daemon.editors.hook import gate
from daemon.editors.hook.config import GateScope, HookConfig
from daemon.editors.hook.deltas import ShardDelta, key_values
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.gate import (
    DEFAULT_SUBJECT_COS_FLOOR,
    FactLabel,
    Scope,
    SubjectIndex,
    SubjectScope,
    floor_rule,
    pair_cosines,
    round_up,
)
from daemon.editors.hook.setup import choose_layout, set_subject_floor, world_floor_facts
from daemon.model.loading import LoadedModel, load_model
from daemon.model.tokens import subject_grams
from daemon.world.build import load_world
from tests.daemon.editors.hook.conftest import (
    build_from_config,
    edit_specs,
    hook_config,
    prompt_logits,
)


def _build(loaded: LoadedModel, stats: Path, gate_scope: GateScope = "subject") -> HookEditor:
    """A hook editor on ``loaded`` with the given gate (the config's default: subject)."""
    return build_from_config(loaded, hook_config(gate_scope=gate_scope), stats_dir=stats)


@pytest.fixture
def editor(loaded: LoadedModel, stats: Path) -> HookEditor:
    return _build(loaded, stats)


def _last_routes(editor: HookEditor, loaded: LoadedModel, prompts: list[str]) -> list[int]:
    """The shard each prompt's last token is routed to at the (single) hook layer."""
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        loaded.model(**enc)
    (hook,) = editor.hooks.values()
    assert hook.last_route is not None
    return [int(r) for r in hook.last_route[:, -1]]


# --- subject n-grams and the index ------------------------------------------------------


def test_subject_grams_hold_both_leading_space_variants(loaded: LoadedModel) -> None:
    """BPE tokenises "Velmora" and " Velmora" differently: both are stored, and the
    subject matches at the start of a prompt and in the middle of one."""
    tok = loaded.tokenizer
    grams = subject_grams(tok, "Velmora Duskine", "The home of Velmora Duskine is")
    alone = tuple(tok("Velmora Duskine", add_special_tokens=False)["input_ids"])
    spaced = tuple(tok(" Velmora Duskine", add_special_tokens=False)["input_ids"])
    assert alone != spaced and {alone, spaced} <= grams
    scope = SubjectScope(tok)
    scope.sync(["e1"], {"e1": ("Velmora Duskine", "Velmora Duskine lives in")})
    enc = tok(["Velmora Duskine lives in", "The home of Velmora Duskine is"], padding=True)
    found = scope.scope_for(torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]))
    assert found.candidates.tolist() == [[0], [0]]


def test_the_index_needs_the_whole_subject_and_ignores_pads(loaded: LoadedModel) -> None:
    index = SubjectIndex({"a": frozenset({(5, 6, 7)}), "b": frozenset({(5,)})})
    row = [0, 5, 6, 7, 5, 6]
    assert index.matches_at(row, 1) == [("a", 3), ("b", 1)]
    assert index.matches_at(row, 4) == [("b", 4)]  # 5 6 <end>: not "a"
    assert index.matches_at([0, 5, -1, 7], 1) == [("b", 1)]  # a pad inside "a"
    assert index.matches_at(row, 0) == []
    scope = SubjectScope(loaded.tokenizer)
    scope.sync(["e1"], {"e1": ("Velmora", "Velmora is")})
    enc = loaded.tokenizer(["Velmora is"], return_tensors="pt")
    pads = torch.zeros_like(enc["attention_mask"])
    assert scope.scope_for(enc["input_ids"], pads).candidates.numel() == 0


def test_a_token_sees_a_subject_only_from_where_it_ends(loaded: LoadedModel) -> None:
    """Causal scope: tokens before the subject's last token have no candidates."""
    tok = loaded.tokenizer
    scope = SubjectScope(tok)
    scope.sync(["e1", "e1", "e2"], {"e1": ("Velmora", "Velmora is"), "e2": ("Kest", "Kest is")})
    enc = tok(["The home of Velmora is"], return_tensors="pt")
    found = scope.scope_for(enc["input_ids"], enc["attention_mask"])
    ends = int(found.active_from[0, 0])
    assert sorted(found.candidates[0].tolist()) == [0, 1]  # both key rows of e1, none of e2
    causal = found.causal(enc["input_ids"].shape[1])
    assert causal is not None
    assert not causal[0, :ends].any() and causal[0, ends:].all()  # (T, K)
    decode = found.decoding()
    assert decode.causal(1) is None  # every candidate active
    assert decode.fits((1, 1)) and not found.fits((1, 1))


def test_the_candidate_gate_scores_candidates_only_against_their_floor() -> None:
    """Only candidate keys compete; the floor rejects a near-but-not-close key; rows
    without candidates and tokens before their subject stay closed; snapped values
    are the matched key's output through its shard."""
    torch.manual_seed(0)
    d, d_out = 16, 3
    keys = torch.randn(5, d)
    keys_n = nn.functional.normalize(keys, dim=-1)
    mean, std = torch.zeros(5), torch.full((5,), 0.05)
    basis, _ = torch.linalg.qr(torch.stack([keys_n[1], keys_n[3], torch.randn(d)]).T)
    near = 0.3 * keys_n[1] + (1 - 0.09) ** 0.5 * basis[:, 2]  # cosine .3 to key 1, 0 to 3
    x = torch.stack(
        [
            torch.stack([keys[3], keys[3], near]),  # row 0: candidates 1 and 3
            torch.stack([keys[0], keys[1], keys[3]]),  # row 1: no candidates
        ]
    )  # (B=2, T=3, d)
    candidates = torch.tensor([[1, 3], [-1, -1]])
    causal = torch.tensor([[[False, False], [True, True], [True, True]]]).expand(2, -1, -1)
    shard = torch.tensor([0, 0, 1, 1, 0])
    delta = torch.randn(2, d_out, d)
    values = key_values(keys, shard, [ShardDelta(dense=d) for d in delta])
    assert torch.allclose(values[3], keys[3] @ delta[1].T)

    def routes(floor: float) -> list[list[int]]:
        reach = gate.key_reach(mean, std, 3.0, floor)
        table = gate.candidate_table(candidates, keys_n, reach, shard, values)
        assert table is not None
        fire, winner = gate.route_table(x, torch.zeros(d), table, causal)
        return gate.routes_of(table, fire, winner).tolist()

    assert routes(0.5) == [[-1, 1, -1], [-1, -1, -1]]
    assert routes(0.2) == [[-1, 1, 0], [-1, -1, -1]]  # a lower floor lets .3 reach key 1
    reach = gate.key_reach(mean, std, 3.0, 0.5)
    table = gate.candidate_table(candidates, keys_n, reach, shard, values)
    assert table is not None
    fire, winner = gate.route_table(x, torch.zeros(d), table, causal)
    out = torch.randn(2, 3, d_out)
    got = gate.add_values(out, table, fire, winner)
    assert torch.equal(got[1], out[1]) and torch.equal(got[0, [0, 2]], out[0, [0, 2]])
    assert torch.allclose(got[0, 1], out[0, 1] + values[3])
    assert gate.candidate_table(candidates[1:], keys_n, reach, shard, values) is None


# --- the gate in the editor ---------------------------------------------------------------


def test_the_gate_opens_only_where_the_subject_is_named(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    """Rephrases (same subject) route; the same template about another subject never
    does, and its logits are the base model's bit for bit."""
    e = edits[0]
    others = [p["prompt"] for p in e["locality"] if e["subject"] not in p["prompt"]]
    base = prompt_logits(loaded, others)
    assert all(o.accepted for o in editor.apply(edit_specs(edits)))
    assert all(r >= 0 for r in _last_routes(editor, loaded, [e["prompt"], *e["rephrases"]]))
    assert others and _last_routes(editor, loaded, others) == [-1] * len(others)
    (hook,) = editor.hooks.values()
    assert hook.last_route is not None and not bool((hook.last_route >= 0).any())
    assert torch.equal(prompt_logits(loaded, others), base)


def test_the_same_subject_under_another_relation_is_rejected_by_the_floor(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    assert all(o.accepted for o in editor.apply(edit_specs(edits)))
    probes = [p["prompt"] for e in edits for p in e["locality"] if e["subject"] in p["prompt"]]
    assert probes
    subject_of = {p: e["subject"] for e in edits for p in [q["prompt"] for q in e["locality"]]}
    scope = editor.scope
    assert scope is not None
    enc = loaded.tokenizer(probes, return_tensors="pt", padding=True)
    found = scope.scope_for(enc["input_ids"], enc["attention_mask"])
    assert bool((found.candidates >= 0).any(dim=1).all()), "every probe names an edited subject"
    assert _last_routes(editor, loaded, probes) == [-1] * len(probes), [
        (p, subject_of[p]) for p in probes
    ]


def test_retraction_removes_the_subject_from_the_index(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    e = edits[0]
    base = prompt_logits(loaded, [e["prompt"], *e["rephrases"]])
    editor.apply(edit_specs(edits))
    assert editor.scope is not None and e["id"] in editor.scope.edits()
    editor.retract([e["id"]])
    assert e["id"] not in editor.scope.edits()
    assert sorted(editor.scope.edits()) == sorted(x["id"] for x in edits[1:])
    enc = loaded.tokenizer([e["prompt"]], return_tensors="pt")
    assert editor.scope.scope_for(enc["input_ids"], enc["attention_mask"]).candidates.numel() == 0
    assert torch.equal(prompt_logits(loaded, [e["prompt"], *e["rephrases"]]), base)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_decode_steps_keep_the_prefill_scope(
    editor: HookEditor,
    loaded: LoadedModel,
    edits: list[dict[str, Any]],
    cache_implementation: str,
) -> None:
    """KV-cached generation: the prefill decides the candidates, every decode step keeps
    them; cached and uncached greedy answers agree, whichever cache class holds the
    keys and values (the decision must not depend on it)."""
    editor.apply(edit_specs(edits))
    assert editor.scope is not None
    seen: list[Scope | None] = []
    (hook,) = editor.hooks.values()
    scope = editor.scope
    handle = hook.register_forward_pre_hook(lambda *_: seen.append(scope.current()))
    prompts = [edits[0]["prompt"], edits[1]["rephrases"][0]]
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    model: Any = loaded.model
    gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": loaded.tokenizer.pad_token_id}
    try:
        with torch.no_grad():
            cached = model.generate(**enc, cache_implementation=cache_implementation, **gen)
    finally:
        handle.remove()
    assert len(seen) >= 2 and all(s is not None for s in seen)
    first, *steps = [s for s in seen if s is not None]
    assert first.prefill and not any(s.prefill for s in steps)
    assert all(torch.equal(s.candidates, first.candidates) for s in steps)
    with torch.no_grad():
        uncached = model.generate(**enc, use_cache=False, **gen)
    assert torch.equal(cached, uncached)


def test_without_input_ids_the_key_gate_decides(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    editor.apply(edit_specs(edits))
    enc = loaded.tokenizer([edits[0]["prompt"]], return_tensors="pt")
    embeds = loaded.model.get_input_embeddings()(enc["input_ids"])
    with torch.no_grad():
        loaded.model(inputs_embeds=embeds, attention_mask=enc["attention_mask"])
    assert editor.scope is not None and editor.scope.current() is None
    (hook,) = editor.hooks.values()
    assert hook.last_route is not None and int(hook.last_route[0, -1]) >= 0


def test_a_key_gate_state_loads_into_a_subject_gate_editor(
    loaded: LoadedModel,
    micro_world: Path,
    stats: Path,
    edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The subject index is rebuilt from the records: no new persisted state, and the
    subject editor's state round-trips to bit-identical logits."""
    keyed = _build(loaded, stats, gate_scope="key")
    keyed.apply(edit_specs(edits))
    keyed.save(tmp_path / "keyed")
    fresh = load_model(str(micro_world), device="cpu")
    subject = _build(fresh, stats)
    subject.load(tmp_path / "keyed")
    assert subject.scope is not None
    assert sorted(subject.scope.edits()) == sorted(e["id"] for e in edits)
    assert all(r >= 0 for r in _last_routes(subject, fresh, [e["prompt"] for e in edits]))
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    expected = prompt_logits(fresh, prompts)
    other = load_model(str(micro_world), device="cpu")
    _build(other, stats).load_state_dict(subject.state_dict())
    assert torch.equal(prompt_logits(other, prompts), expected)


def test_a_shared_route_lets_the_first_hook_layer_decide_for_all(
    loaded: LoadedModel, stats: Path, edits: list[dict[str, Any]]
) -> None:
    """With ``gate_shared_route`` (default) every hook layer routes each token as the
    lowest one did, and the edits still take."""
    cfg = hook_config()
    hook_cfg = dataclasses.replace(cfg.editors.hook, layers=(0, 1))
    cfg = dataclasses.replace(cfg, editors=cfg.editors.with_sections(hook=hook_cfg))
    editor = build_from_config(loaded, cfg, stats_dir=stats)
    assert editor.config.gate_shared_route
    assert all(o.accepted for o in editor.apply(edit_specs(edits)))
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        loaded.model(**enc)
    low, high = (h.last_route for h in editor.hooks.values())
    assert low is not None and high is not None and torch.equal(low, high)
    assert bool((low[: len(edits), -1] >= 0).all())


def test_the_config_names_a_bad_gate_scope_or_floor() -> None:
    with pytest.raises(ValueError, match="must be one of") as scope:
        HookConfig(gate_scope="tokens")  # type: ignore[arg-type]
    assert getattr(scope.value, "key", None) == "gate_scope"
    with pytest.raises(ValueError, match="in \\[-1, 1\\]") as floor:
        HookConfig(gate_subject_cos_floor=2.0)
    assert getattr(floor.value, "key", None) == "gate_subject_cos_floor"


def test_a_configured_subject_floor_is_the_layouts(loaded: LoadedModel) -> None:
    """A number is taken as it is; the gate's other keys stay in the config."""
    layout = choose_layout(loaded, HookConfig(layers=(1,), gate_subject_cos_floor=0.4), None)
    assert layout.subject_cos_floor == 0.4


# --- the subject gate's floor: the pure rule -----------------------------------------------


def test_the_floor_is_the_negative_quantile_rounded_up() -> None:
    """0.98 quantile of 0..0.5 in 1,001 steps is 0.49: the floor is 0.49 (no float noise
    bumps it to 0.50), and 21 of the 1,001 negatives (0.49 to 0.50) reach it."""
    assert gate.NEG_QUANTILE == 0.98
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
    evidence = floor_rule(torch.full((gate.MIN_PAIRS,), value), torch.zeros(0))
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
    assert floor_rule(torch.zeros(gate.MIN_PAIRS - 1), torch.ones(500)) is None
    assert floor_rule(torch.zeros(gate.MIN_PAIRS), torch.ones(500)) is not None


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


def test_an_auto_floor_starts_at_the_default(loaded: LoadedModel) -> None:
    """``"auto"`` is resolved after the editor is built; the layout starts at 0.55."""
    cfg = HookConfig(layers=(1,), gate_subject_cos_floor="auto")
    assert choose_layout(loaded, cfg, None).subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR


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
        editor = build_from_config(
            loaded, hook_config(gate_subject_cos_floor="auto"), stats_dir=stats
        )
    (event,) = _events(logs, "hook_floor_calibrated")
    return editor, event


def test_auto_calibrates_logs_and_exposes_the_floor(
    auto_editor: tuple[HookEditor, dict[str, Any]],
) -> None:
    editor, event = auto_editor
    floor = event["floor"]
    assert gate.FLOOR_MIN <= floor <= gate.FLOOR_MAX
    assert event["negatives"] >= gate.MIN_PAIRS and event["positives"] > 0
    assert 0.0 <= event["positive_pass_rate"] <= 1.0
    assert editor.layout.subject_cos_floor == floor
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
    # no cosine passes it: a key's cosine with itself may round above 1.0 in float32
    # (it did on one CPU and not on another), so the floor sits just above 1.0
    set_subject_floor(editor, 1.001)
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
        editor = build_from_config(load_model(str(plain), device="cpu"), config, stats_dir=stats)
    (known,) = _events(logs, "common_facts_known")
    assert known["known"] == 0 and known["facts"] > 200
    (event,) = _events(logs, "hook_floor_default")
    assert "no subject with facts under two relations" in event["reason"]
    assert event["floor"] == DEFAULT_SUBJECT_COS_FLOOR
    assert not _events(logs, "hook_floor_calibrated")
    assert editor.layout.subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR
    assert all(h.subject_floor == DEFAULT_SUBJECT_COS_FLOOR for h in editor.hooks.values())


def test_the_key_gate_keeps_the_default(loaded: LoadedModel, stats: Path) -> None:
    config = hook_config(gate_subject_cos_floor="auto", gate_scope="key")
    with capture_logs() as logs:
        editor = build_from_config(loaded, config, stats_dir=stats)
    (event,) = _events(logs, "hook_floor_default")
    assert "gate_scope" in event["reason"]
    assert editor.layout.subject_cos_floor == DEFAULT_SUBJECT_COS_FLOOR


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
    other = build_from_config(
        fresh, hook_config(gate_subject_cos_floor=other_floor), stats_dir=stats
    )
    assert other.layout.subject_cos_floor == other_floor
    other.load(tmp_path / "hook")
    assert other.layout.subject_cos_floor == event["floor"]
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
    other = build_from_config(fresh, hook_config(gate_subject_cos_floor=0.45), stats_dir=stats)
    other.load_state_dict({**state, "tensors": tensors})
    assert other.layout.subject_cos_floor == 0.45
    assert all(h.subject_floor == 0.45 for h in other.hooks.values())
