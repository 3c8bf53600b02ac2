"""Locate on the micro world: pairs, batched interchange patching, the choice rule, the cache."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.hook.locate import (
    LocateEvidence,
    LocateResult,
    TraceScores,
    best_window,
    cached_locate,
    choose,
    default_window,
    latest_locate,
    locate,
    make_pairs,
    request_trace_facts,
    trace_recall,
    world_trace_facts,
)
from daemon.editors.hook.patching import KINDS, SITES, TraceFact
from daemon.errors import LocateError
from daemon.model import arch
from daemon.model.loading import LoadedModel, load_model
from daemon.model.tokens import subject_last_token_index
from daemon.world.build import load_world

N_PAIRS = 32


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


@pytest.fixture(scope="module")
def facts(micro_world: Path) -> list[TraceFact]:
    return world_trace_facts(load_world(micro_world), limit=4 * N_PAIRS)


@pytest.fixture(scope="module")
def result(loaded: LoadedModel, facts: list[TraceFact]) -> LocateResult:
    return locate(loaded, facts, max_pairs=N_PAIRS)


def _evidence(mlp: dict[str, list[float]], res: dict[str, list[float]]) -> LocateEvidence:
    """Hand-made evidence; donor probabilities equal the moved fractions."""
    n = len(mlp["subject_last"])
    scores = {
        "mlp_out": {k: TraceScores(tuple(mlp[k]), tuple(mlp[k])) for k in KINDS},
        "residual": {k: TraceScores(tuple(res[k]), tuple(res[k])) for k in KINDS},
    }
    return LocateEvidence(n, 10, 20, 20, 2, 0.0, scores)  # type: ignore[arg-type]


# --- facts and pairs -------------------------------------------------------------------


def test_world_facts_interleave_templates_and_are_deterministic(micro_world: Path) -> None:
    """Templates take turns of 4 facts, relations first, so short prefixes still pair up."""
    world = load_world(micro_world)
    n_templates = sum(len(r.train_templates) for r in world.relations)
    first = world_trace_facts(world, limit=4 * n_templates)
    counts = Counter(f.template() for f in first)
    assert len(counts) == n_templates and set(counts.values()) == {4}
    assert all(f.answer is not None and f.subject in f.prompt for f in first)
    short = world_trace_facts(world, limit=4 * len(world.relations))
    assert len({f.template() for f in short}) == len(world.relations)
    assert world_trace_facts(world, limit=50) == world_trace_facts(world, limit=50)
    assert world_trace_facts(world, limit=50, seed=1) != world_trace_facts(world, limit=50)


def test_template_replaces_the_subject_with_a_placeholder() -> None:
    fact = TraceFact("The CEO of Acme Corp is", " Acme Corp", " Jane")
    assert fact.template() == "The CEO of {subject} is"


def test_pairs_share_a_template_and_differ_in_subject_and_answer_token() -> None:
    """Same-answer and same-subject members are skipped; groups are interleaved."""
    facts = [
        TraceFact("A lives in X", "A"),
        TraceFact("B lives in X", "B"),
        TraceFact("C lives in X", "C"),
        TraceFact("The boss of A is", "A"),
        TraceFact("The boss of D is", "D"),
        TraceFact("E sings", "E"),  # alone under its template: never paired
    ]
    tokens = [1, 1, 2, 3, 4, 5]
    pairs = make_pairs(facts, tokens, max_pairs=10)
    assert pairs == [(0, 2), (3, 4), (1, 2), (4, 3), (2, 0)]
    for a, b in pairs:
        assert facts[a].template() == facts[b].template()
        assert tokens[a] != tokens[b] and facts[a].subject != facts[b].subject
    assert make_pairs(facts, tokens, max_pairs=2) == [(0, 2), (3, 4)]


def test_request_facts_use_prompts_and_rephrases_that_hold_the_subject(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    rows = [
        {
            "prompt": "Acme is led by",
            "target": " Jo",
            "subject": "Acme",
            "rephrases": ["The boss of Acme is", "Who runs it?"],
        },
        {"prompt": "Initech is led by", "target": " Bill"},
        {"target": " nobody"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    facts, skipped = request_trace_facts(path)
    assert facts == [TraceFact("Acme is led by", "Acme"), TraceFact("The boss of Acme is", "Acme")]
    assert len(skipped) == 2
    assert "no subject" in skipped[0] and "prompt" in skipped[1]


# --- the evidence ------------------------------------------------------------------------


def _naive_moved(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    a: TraceFact,
    b: TraceFact,
    where: tuple[str, int, str],
) -> bool:
    """One unpadded prompt at a time: patch A with B's state, compare with B's greedy token."""
    site, layer, kind = where
    if site == "residual":
        module = arch.layer_block(model, layer)
    else:
        module = arch.mlp_out_module(model, layer)
    ids_a = tok(a.prompt, return_tensors="pt")["input_ids"]
    ids_b = tok(b.prompt, return_tensors="pt")["input_ids"]

    def pos(fact: TraceFact, ids: torch.Tensor) -> int:
        if kind == "prompt_last":
            return int(ids.shape[1]) - 1
        return subject_last_token_index(tok, fact.prompt, fact.subject)

    seen: dict[str, torch.Tensor] = {}

    def grab(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> None:
        seen["b"] = out[0, pos(b, ids_b)]  # (d,)

    def put(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, pos(a, ids_a)] = seen["b"]
        return out

    with torch.no_grad():
        handle = module.register_forward_hook(grab)
        try:
            donor = int(model(ids_b).logits[0, -1].argmax())
        finally:
            handle.remove()
        handle = module.register_forward_hook(put)
        try:
            greedy = int(model(ids_a).logits[0, -1].argmax())
        finally:
            handle.remove()
    return greedy == donor


def _random_gpt2(tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """An untrained 2-layer GPT-2 (absolute positions, Conv1D projections) on the world vocab."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train(False)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_patching_matches_one_prompt_at_a_time(
    kind: str, loaded: LoadedModel, facts: list[TraceFact]
) -> None:
    """Left padding, row-wise plans and hooks give the same moves as unpadded single runs.

    The untrained GPT-2 (absolute position embeddings, so padding must not shift
    positions) answers with its own greedy tokens (``answer=None``).
    """
    tok = loaded.tokenizer
    few = facts[:64]
    model = loaded.model
    if kind == "gpt2":
        model = _random_gpt2(tok)
        few = [TraceFact(f.prompt, f.subject) for f in few]
    evidence = trace_recall(model, tok, few, max_pairs=6, batch_rows=7)
    with torch.no_grad():
        greedy = [
            int(model(tok(f.prompt, return_tensors="pt")["input_ids"]).logits[0, -1].argmax())
            for f in few
        ]
    pairs = make_pairs(few, greedy, max_pairs=6)  # every micro-world fact is recalled
    assert evidence.n_recalled == len(few) and evidence.n_pairs == len(pairs) == 6
    for site in SITES:
        for pos in KINDS:
            for layer in range(evidence.n_layers):
                where = (site, layer, pos)
                naive = [_naive_moved(model, tok, few[a], few[b], where) for a, b in pairs]
                got = evidence.scores[site][pos].moved[layer]
                assert got == pytest.approx(sum(naive) / len(naive)), where


def test_micro_world_recalls_at_the_prompts_last_token(result: LocateResult) -> None:
    """The last layer's residual at the last token IS the prediction; at the subject it is inert.

    Measured on this 2-layer world (32 pairs): mlp_out moves 0.31/0.00 of answers at the
    subject's last token and 0.06/0.47 at the prompt's last token, so the hook keys at
    prompt_last in layer 1.
    """
    ev = result.evidence
    last = ev.n_layers - 1
    assert (ev.n_layers, ev.n_pairs, ev.n_templates) == (2, N_PAIRS, N_PAIRS)
    assert ev.scores["residual"]["prompt_last"].moved[last] == 1.0
    assert ev.scores["residual"]["subject_last"].moved[last] == 0.0
    assert ev.scores["mlp_out"]["subject_last"].moved[last] == 0.0
    assert ev.baseline_donor_prob < 0.05
    mlp = ev.scores["mlp_out"]
    assert sum(mlp["prompt_last"].moved) > sum(mlp["subject_last"].moved)
    assert (result.key_position, result.layers, result.window) == ("prompt_last", (1,), 1)
    assert (result.key_position, result.layers) == choose(ev)
    assert result.n_pairs == N_PAIRS and len(result.fingerprint) == 64


def test_tracing_leaves_no_hooks_and_restores_training_mode(
    loaded: LoadedModel, facts: list[TraceFact]
) -> None:
    model = loaded.model
    model.train(True)
    try:
        trace_recall(model, loaded.tokenizer, facts[:40], max_pairs=4)
        assert model.training
    finally:
        model.train(False)
    modules = [arch.layer_block(model, i) for i in range(2)]
    modules += [arch.mlp_out_module(model, i) for i in range(2)]
    assert all(not m._forward_hooks for m in modules)


def test_model_answers_stand_in_for_unknown_targets(
    loaded: LoadedModel, facts: list[TraceFact]
) -> None:
    """answer=None (a user's edit file) takes the model's own greedy token as the answer."""
    bare = [TraceFact(f.prompt, f.subject) for f in facts[:64]]
    with_answers = trace_recall(loaded.model, loaded.tokenizer, facts[:64], max_pairs=8)
    without = trace_recall(loaded.model, loaded.tokenizer, bare, max_pairs=8)
    assert without == with_answers


def test_too_few_pairs_is_a_clear_error(loaded: LoadedModel, facts: list[TraceFact]) -> None:
    wrong = [TraceFact(f.prompt, f.subject, " zzzz") for f in facts[:20]]
    with pytest.raises(LocateError, match="only 0 usable prompt pairs"):
        trace_recall(loaded.model, loaded.tokenizer, wrong, max_pairs=8)
    with pytest.raises(LocateError, match="need 8"):
        trace_recall(loaded.model, loaded.tokenizer, facts[:3], max_pairs=8)


# --- the choice rule -------------------------------------------------------------------


def test_key_position_follows_mlp_then_residual_evidence() -> None:
    zero = [0.0, 0.0, 0.0, 0.0]
    ev = _evidence(
        {"subject_last": [0, 0.5, 0, 0], "prompt_last": [0, 0, 0, 0.4]},
        {"subject_last": zero, "prompt_last": [1, 1, 1, 1]},
    )
    assert choose(ev) == ("subject_last", (1, 2))
    tie = _evidence(
        {"subject_last": zero, "prompt_last": zero},
        {"subject_last": zero, "prompt_last": [0, 0, 0, 1]},
    )
    assert choose(tie)[0] == "prompt_last"
    nothing = _evidence(
        {"subject_last": zero, "prompt_last": zero}, {"subject_last": zero, "prompt_last": zero}
    )
    assert choose(nothing) == ("subject_last", (2, 3))  # all tied: the deepest window


def test_window_is_contiguous_highest_sum_and_deeper_on_ties() -> None:
    ev = _evidence(
        {"subject_last": [0.1, 0.3, 0.3, 0.1], "prompt_last": [0.2, 0.0, 0.0, 0.2]},
        {k: [0.0] * 4 for k in KINDS},
    )
    assert best_window(ev, "subject_last", 2) == (1, 2)
    assert best_window(ev, "subject_last", 3) == (1, 2, 3)
    assert best_window(ev, "prompt_last", 1) == (3,)
    assert best_window(ev, "prompt_last", 9) == (0, 1, 2, 3)  # a window of all layers
    # layer 0 is never a candidate from 4 layers, whatever its evidence
    early = _evidence(
        {"subject_last": [0.9, 0.0, 0.0, 0.0], "prompt_last": [0.9, 0.1, 0.0, 0.0]},
        {k: [0.0] * 4 for k in KINDS},
    )
    assert best_window(early, "prompt_last", 2) == (1, 2)
    assert best_window(early, "prompt_last", 1) == (1,)
    with pytest.raises(ValueError, match="window"):
        best_window(ev, "prompt_last", 0)
    assert [default_window(n) for n in (1, 2, 3, 4, 6, 12, 28, 48)] == [1, 1, 1, 2, 2, 3, 7, 12]


def test_result_round_trips_through_json(result: LocateResult) -> None:
    text = json.dumps(result.to_json())
    data = json.loads(text)
    assert data["version"] == 1 and data["layers"] == [1]
    assert LocateResult.from_json(data) == result
    assert result.layout() == ((1,), "prompt_last")
    with pytest.raises(LocateError, match="version"):
        LocateResult.from_json({**data, "version": 99})
    with pytest.raises(LocateError, match="malformed"):
        LocateResult.from_json({**data, "key_position": "middle"})
    data["evidence"]["scores"]["mlp_out"]["prompt_last"]["moved"] = [0.5]
    with pytest.raises(LocateError, match="n_layers"):
        LocateResult.from_json(data)


# --- the cache -----------------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as logs:
        yield logs


def _names(logs: list[MutableMapping[str, Any]]) -> list[object]:
    return [e["event"] for e in logs if str(e["event"]).startswith(("locate", "recall"))]


def test_cache_is_reused_rechosen_and_recomputed_when_corrupt(
    tmp_path: Path,
    loaded: LoadedModel,
    facts: list[TraceFact],
    events: list[MutableMapping[str, Any]],
) -> None:
    first = cached_locate(tmp_path, loaded, facts, max_pairs=N_PAIRS)
    (path,) = tmp_path.glob("locate-*.json")
    assert _names(events) == ["recall_traced", "locate_computed"]
    events.clear()

    again = cached_locate(tmp_path, loaded, facts, max_pairs=N_PAIRS)
    assert again == first
    assert _names(events) == ["locate_reused"]
    events.clear()

    wide = cached_locate(tmp_path, loaded, facts, max_pairs=N_PAIRS, window=2)
    assert wide.layers == (0, 1) and wide.evidence == first.evidence
    assert _names(events) == ["locate_reused"]
    assert latest_locate(tmp_path, loaded) == first
    events.clear()

    path.write_text('{"key": {"version": 1}, "res')
    recomputed = cached_locate(tmp_path, loaded, facts, max_pairs=N_PAIRS)
    assert _names(events) == ["locate_cache_invalidated", "recall_traced", "locate_computed"]
    assert events[0]["log_level"] == "warning"
    assert recomputed.evidence == first.evidence
    assert json.loads(path.read_text())["result"]["version"] == 1


def test_cache_key_separates_facts_and_pair_budgets(
    tmp_path: Path, loaded: LoadedModel, facts: list[TraceFact]
) -> None:
    cached_locate(tmp_path, loaded, facts, max_pairs=N_PAIRS)
    cached_locate(tmp_path, loaded, facts, max_pairs=16)
    cached_locate(tmp_path, loaded, facts[:100], max_pairs=16)
    assert len(list(tmp_path.glob("locate-*.json"))) == 3
    assert latest_locate(tmp_path / "absent", loaded) is None
