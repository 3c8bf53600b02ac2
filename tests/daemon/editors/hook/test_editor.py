"""The COMEBA-HK editor on the micro world: edits take, hold, retract, round-trip, refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.editors.base import EditSpec
from daemon.editors.hook import targets as targets_module
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.keys import encode_sites
from daemon.editors.hook.solve import GUARD_MIN_HISTORY
from daemon.model.answers import continuation_matches
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits
from tests.daemon.editors.hook.conftest import (
    N_EDITS,
    build_from_config,
    edit_specs,
    hook_config,
    prompt_logits,
)


@pytest.fixture
def editor(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> HookEditor:
    stats = tmp_path_factory.getbasetemp() / "hook-stats"  # shared: computed once
    return build_from_config(loaded, hook_config(), stats_dir=stats)


def _answers(loaded: LoadedModel, prompts: list[str]) -> list[str]:
    return greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6)


def test_a_batch_takes_and_unrelated_prompts_hold(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    locality = [p for e in edits for p in e["locality"]]
    outcomes = editor.apply(edit_specs(edits))
    assert all(o.accepted for o in outcomes), [o.reason for o in outcomes]
    got = _answers(loaded, [e["prompt"] for e in edits])
    hits = [continuation_matches(g, e["target"]) for g, e in zip(got, edits, strict=True)]
    assert sum(hits) >= N_EDITS - 1, list(zip(got, [e["target"] for e in edits], strict=True))
    kept = _answers(loaded, [p["prompt"] for p in locality])
    held = [continuation_matches(g, p["target"]) for g, p in zip(kept, locality, strict=True)]
    assert sum(held) / len(held) >= 0.8
    assert editor.applied_ids() == [e["id"] for e in edits]
    health = editor.health()
    assert health["edits"] == N_EDITS and health["gate_keys"] >= N_EDITS
    assert all(0 < v < 50 for v in health["delta_norm_ratio"].values())


def test_retracting_everything_restores_the_base_model_bit_for_bit(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    base = prompt_logits(loaded, prompts)
    editor.apply(edit_specs(edits[:3]))
    editor.apply(edit_specs(edits[3:]))
    assert not torch.equal(prompt_logits(loaded, prompts), base)
    editor.retract([e["id"] for e in edits])
    assert editor.applied_ids() == []
    assert torch.equal(prompt_logits(loaded, prompts), base)


def test_retracting_one_edit_forgets_it_and_keeps_the_others(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    base = _answers(loaded, [e["prompt"] for e in edits])
    editor.apply(edit_specs(edits))
    before = _answers(loaded, [e["prompt"] for e in edits])
    editor.retract([edits[0]["id"]])
    after = _answers(loaded, [e["prompt"] for e in edits])
    assert after[0] == base[0]
    for b, a, e in zip(before[1:], after[1:], edits[1:], strict=True):
        if continuation_matches(b, e["target"]):
            assert continuation_matches(a, e["target"]), (a, e["target"])
    with pytest.raises(Exception, match="not applied"):
        editor.retract(["no-such-edit"])


def test_state_round_trips_to_bit_identical_logits(
    editor: HookEditor,
    edits: list[dict[str, Any]],
    micro_world: Path,
    loaded: LoadedModel,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    editor.apply(edit_specs(edits[:4]))
    editor.apply(edit_specs(edits[4:]))
    editor.retract([edits[1]["id"]])
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    expected = prompt_logits(loaded, prompts)
    editor.save(tmp_path / "hook")
    state = editor.state_dict()

    for restore in ("directory", "state_dict"):
        fresh = load_model(str(micro_world), device="cpu")
        other = build_from_config(
            fresh, hook_config(), stats_dir=tmp_path_factory.getbasetemp() / "hook-stats"
        )
        if restore == "directory":
            other.load(tmp_path / "hook")
        else:
            other.load_state_dict(state)
        assert other.applied_ids() == editor.applied_ids()
        assert torch.equal(prompt_logits(fresh, prompts), expected)
        # retraction keeps working after a reload
        other.retract([edits[0]["id"]])
        assert edits[0]["id"] not in other.applied_ids()


def test_bad_edits_are_refused_with_reasons(
    editor: HookEditor, edits: list[dict[str, Any]]
) -> None:
    e = edits[0]
    no_subject = EditSpec("a", e["prompt"], e["target"])
    too_long = EditSpec("b", e["prompt"], " x" * 40, e["subject"], e["relation"])
    first = EditSpec("c", e["prompt"], e["target"], e["subject"], e["relation"])
    conflict = EditSpec("d", e["prompt"], edits[1]["target"], e["subject"], e["relation"])
    outcomes = {o.edit_id: o for o in editor.apply([no_subject, too_long, first, conflict])}
    assert "needs a subject" in (outcomes["a"].reason or "")
    assert "tokens" in (outcomes["b"].reason or "")
    assert "conflicting targets" in (outcomes["c"].reason or "")
    assert "conflicting targets" in (outcomes["d"].reason or "")
    assert editor.applied_ids() == []


def test_duplicates_merge_and_a_later_edit_supersedes(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    e = edits[0]
    one = EditSpec("one", e["prompt"], e["target"], e["subject"], e["relation"])
    same = EditSpec("same", e["prompt"], e["target"], e["subject"], e["relation"])
    outcomes = editor.apply([one, same])
    assert all(o.accepted for o in outcomes)
    assert outcomes[1].details["merged_into"] == "one"
    assert editor.applied_ids() == ["one", "same"]
    newer = EditSpec("newer", e["prompt"], edits[1]["target"], e["subject"], e["relation"])
    (outcome,) = editor.apply([newer])
    assert outcome.accepted and outcome.details["superseded"] == ["one", "same"]
    assert editor.applied_ids() == ["newer"]
    assert continuation_matches(_answers(loaded, [e["prompt"]])[0], edits[1]["target"])


def test_a_non_finite_solve_aborts_the_batch_and_changes_nothing(
    editor: HookEditor,
    loaded: LoadedModel,
    edits: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    editor.apply(edit_specs(edits[:2]))
    prompts = [e["prompt"] for e in edits]
    before = prompt_logits(loaded, prompts)
    real = targets_module.optimise_targets

    def poisoned(*args: Any, **kwargs: Any) -> targets_module.TargetResult:
        result = real(*args, **kwargs)
        return dataclasses.replace(result, values=result.values * float("nan"))

    monkeypatch.setattr("daemon.editors.hook.editor.optimise_targets", poisoned)
    outcomes = editor.apply(edit_specs(edits[2:4]))
    assert not any(o.accepted for o in outcomes)
    assert all("non-finite" in (o.reason or "") for o in outcomes)
    assert editor.applied_ids() == [edits[0]["id"], edits[1]["id"]]
    assert torch.equal(prompt_logits(loaded, prompts), before)


def test_the_collapse_guard_refuses_an_outlier_update(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    tiny = [1e-6, 1.1e-6, 0.9e-6, 1e-6, 1.05e-6]
    for layer in editor.norm_history:  # a long enough history of tiny updates
        editor.norm_history[layer] = tiny * (GUARD_MIN_HISTORY // len(tiny) + 1)
    prompts = [e["prompt"] for e in edits]
    before = prompt_logits(loaded, prompts)
    outcomes = editor.apply(edit_specs(edits[:2]))
    assert not any(o.accepted for o in outcomes)
    assert all("collapse guard" in (o.reason or "") for o in outcomes)
    assert torch.equal(prompt_logits(loaded, prompts), before)


def test_key_sites_cover_each_target_token_or_the_subject(loaded: LoadedModel) -> None:
    tok = loaded.tokenizer
    prompts = ["A long prompt about Velmora is", "Velmora is"]
    targets = [" x", " x y z"]
    subjects = ["Velmora", "Velmora"]
    sites, labels = encode_sites(
        tok, prompts, targets, subjects, [0, 1], "prompt_last", torch.device("cpu")
    )
    for s in range(sites.rows.shape[0]):  # each site's next token is a target token
        assert int(labels[sites.rows[s], sites.positions[s]]) != -100
    counts = torch.bincount(sites.owner).tolist()
    n_tokens = [int((labels[r] != -100).sum()) for r in range(2)]
    assert counts == n_tokens
    subject_sites, _ = encode_sites(
        tok, prompts, targets, subjects, [0, 1], "subject_last", torch.device("cpu")
    )
    assert subject_sites.rows.tolist() == [0, 1]
    for r in range(2):
        token = int(subject_sites.input_ids[r, subject_sites.positions[r]])
        piece = str(tok.decode([token])).strip()
        assert piece and "Velmora".endswith(piece)


def _gate_fires_at_prompt_end(editor: HookEditor, loaded: LoadedModel, prompts: list[str]) -> bool:
    """Whether every hook routes the last token of every prompt to some shard."""
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)  # left padded
    with torch.no_grad():
        loaded.model(**enc)
    for hook in editor.hooks.values():
        route = hook.last_route
        if route is None or not bool((route[:, -1] >= 0).all()):
            return False
    return True


def test_the_gate_still_fires_on_early_edits_after_many_later_ones(
    editor: HookEditor, loaded: LoadedModel, micro_world: Path
) -> None:
    """Per-key gate references: later keys never raise the bar for earlier edits.

    (A reference pooled over all stored keys rose with every batch: after 100 micro
    edits the first edits' own prompts no longer passed the gate.)
    """
    stream = counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, 100, seed=11)
    early = stream[:10]
    assert all(o.accepted for o in editor.apply(edit_specs(early)))
    assert _gate_fires_at_prompt_end(editor, loaded, [e["prompt"] for e in early])
    for start in range(10, len(stream), 10):
        outcomes = editor.apply(edit_specs(stream[start : start + 10]))
        assert all(o.accepted for o in outcomes), [o.reason for o in outcomes]
    assert len(editor.applied_ids()) == len(stream)
    assert _gate_fires_at_prompt_end(editor, loaded, [e["prompt"] for e in early])
    got = _answers(loaded, [e["prompt"] for e in early])
    hits = [continuation_matches(g, e["target"]) for g, e in zip(got, early, strict=True)]
    assert sum(hits) >= len(early) - 1, list(zip(got, [e["target"] for e in early], strict=True))


def test_a_batch_whose_gate_misses_its_own_prompts_is_refused(
    editor: HookEditor, loaded: LoadedModel, edits: list[dict[str, Any]]
) -> None:
    """The recall check: every applied edit's key sites must pass the gate, else refuse."""
    prompts = [e["prompt"] for e in edits]
    before = prompt_logits(loaded, prompts)
    for hook in editor.hooks.values():
        hook.cos_floor.fill_(1.5)  # no cosine reaches it: the gate can never fire
        hook.subject_cos_floor.fill_(1.5)  # (the subject gate's floor, likewise)
    outcomes = editor.apply(edit_specs(edits[:2]))
    assert not any(o.accepted for o in outcomes)
    assert all("recall" in (o.reason or "") for o in outcomes)
    assert editor.applied_ids() == []
    assert torch.equal(prompt_logits(loaded, prompts), before)


def test_a_batch_whose_targets_fail_under_the_open_shard_gets_a_shard_of_its_own(
    editor: HookEditor,
    loaded: LoadedModel,
    edits: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Targets optimised under the open shard's delta that do not all converge are
    optimised again in a new, empty shard; the earlier edits' shard is left as it was."""
    real = targets_module.optimise_targets
    calls: list[int] = []

    def first_fails(*args: Any, **kwargs: Any) -> targets_module.TargetResult:
        result = real(*args, **kwargs)
        calls.append(len(calls))
        if len(calls) in (1, 2):  # the first batch's only try, the second batch's first
            return dataclasses.replace(result, converged=(False, *result.converged[1:]))
        return result

    monkeypatch.setattr("daemon.editors.hook.editor.optimise_targets", first_fails)
    editor.apply(edit_specs(edits[:3]))
    assert len(calls) == 1 and editor._hook0().n_shards == 1  # an empty shard: no retry
    shard0 = {i: h.deltas[0] for i, h in editor.hooks.items()}
    outcomes = editor.apply(edit_specs(edits[3:]))
    assert all(o.accepted for o in outcomes)
    assert len(calls) == 3 and editor._hook0().n_shards == 2
    assert all(h.deltas[0] is shard0[i] for i, h in editor.hooks.items())  # untouched
    assert {editor._records[e["id"]].shard for e in edits[3:]} == {1}
    got = _answers(loaded, [e["prompt"] for e in edits])
    hits = [continuation_matches(g, e["target"]) for g, e in zip(got, edits, strict=True)]
    assert sum(hits) >= N_EDITS - 1
