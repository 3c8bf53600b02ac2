"""The shared dispatch (route, apply, verify, retract, escalate) with scripted back-ends.

The back-ends here never touch the model, so every verification of a
counterfactual target fails: that is the retraction path. The micro world gives
the tokenizer the router counts target tokens with and the model verify runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from daemon.config import RouterConfig
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.registry import HOOK, MELO
from daemon.engine.dispatch import DispatchHooks, DispatchItem, Step, dispatch, request_for
from daemon.engine.engine import Engine
from daemon.model.loading import LoadedModel, load_model
from store.schema import Backend, EditKind, EditRequest


class Scripted:
    """Accepts every edit except ``refuse``; ``crash`` makes ``apply`` raise."""

    def __init__(
        self,
        name: str,
        refuse: Sequence[str] = (),
        crash: bool = False,
        reads_subjects: bool = False,
    ) -> None:
        self.name = name
        self.reads_subjects = reads_subjects
        self.refuse = set(refuse)
        self.crash = crash
        self.held: list[str] = []
        self.calls: list[list[str]] = []

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        self.calls.append([e.edit_id for e in edits])
        if self.crash:
            self.held.extend(e.edit_id for e in edits)  # half-applied, then raises
            raise RuntimeError("boom")
        out = []
        for e in edits:
            ok = e.edit_id not in self.refuse
            if ok:
                self.held.append(e.edit_id)
            out.append(EditOutcome(e.edit_id, ok, None if ok else "scripted refusal", {"by": 1}))
        return out

    def retract(self, edit_ids: Sequence[str]) -> None:
        self.held = [e for e in self.held if e not in set(edit_ids)]

    def applied_ids(self) -> list[str]:
        return list(self.held)

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


def _engine(loaded: LoadedModel, **editors: Scripted) -> Engine:
    table: dict[Backend, Editor] = {Backend(k): v for k, v in editors.items()}
    return Engine(loaded, table)


def _items() -> list[DispatchItem]:
    specs = [
        EditSpec("a", "The capital of Zorland is", " Quux", subject="Zorland"),
        EditSpec("b", "The capital of Blip is", " Frob", subject="Blip"),
        EditSpec("c", "A note without a subject:", " anything at all"),
    ]
    return [DispatchItem(s, request_for(s)) for s in specs]


def test_routes_per_edit_and_escalates_a_refused_hook_edit_once(loaded: LoadedModel) -> None:
    """Subject edits go to the hook, the subjectless one to MELO; the hook's refusal is
    retried on MELO in the same batch, and each step is reported to the hooks."""
    hook, melo = Scripted("hook", refuse=["b"]), Scripted("melo")
    engine = _engine(loaded, hook=hook, melo=melo)
    steps: list[Step] = []
    started: list[tuple[Backend, list[str]]] = []
    hooks = DispatchHooks(
        before_step=lambda b, ids: started.append((b, list(ids))), after_step=steps.append
    )
    result = dispatch(engine, _items(), RouterConfig(), verify=False, hooks=hooks)
    assert result.applied == {"a": HOOK, "c": MELO, "b": MELO}
    assert result.escalated == ["b"] and result.failed == {}
    assert result.routes["b"].backend is HOOK
    assert result.details["b"]["escalated_from"] == {
        "backend": "hook",
        "reason": "hook: scripted refusal",
    }
    assert started == [(HOOK, ["a", "b"]), (MELO, ["c", "b"])]
    assert [(s.backend, sorted(s.taken), dict(s.refused)) for s in steps] == [
        (HOOK, ["a"], {"b": "hook: scripted refusal"}),
        (MELO, ["b", "c"], {}),
    ]
    assert hook.held == ["a"] and melo.held == ["c", "b"]


def test_melo_with_subject_keys_takes_every_auto_edit(loaded: LoadedModel) -> None:
    """The engine's MELO editor says it reads subjects: the facts go there, not to the hook."""
    hook, melo = Scripted("hook"), Scripted("melo", reads_subjects=True)
    result = dispatch(_engine(loaded, hook=hook, melo=melo), _items(), RouterConfig(), verify=False)
    assert result.applied == {"a": MELO, "b": MELO, "c": MELO}
    assert hook.calls == [] and melo.calls == [["a", "b", "c"]]
    assert "MELO keys at the subject" in result.routes["a"].reason


def test_failed_verification_is_retracted_and_fails_after_escalation(
    loaded: LoadedModel,
) -> None:
    """Back-ends that do not change the model: every edit fails verification, is
    retracted from the back-end that took it, and fails with the reason."""
    hook, melo = Scripted("hook"), Scripted("melo")
    engine = _engine(loaded, hook=hook, melo=melo)
    failures: list[Backend] = []
    hooks = DispatchHooks(on_verification_failure=failures.append)
    result = dispatch(engine, _items()[:1], RouterConfig(), verify=True, hooks=hooks)
    assert result.applied == {} and result.escalated == ["a"]
    assert result.failed["a"].startswith("melo: verification failed (greedy output")
    assert "verification failed" in result.details["a"]["escalated_from"]["reason"]
    assert not result.verifications["a"].passed
    assert failures == [HOOK, MELO]
    assert hook.held == [] and melo.held == []


def test_no_escalation_a_disabled_backend_and_a_crashing_apply(loaded: LoadedModel) -> None:
    """Without escalation a refusal fails; an explicit request for a missing back-end
    fails without an apply; a crashing apply is retracted and fails every edit."""
    hook = Scripted("hook", refuse=["a"])
    engine = _engine(loaded, hook=hook)
    items = _items()
    forced = DispatchItem(items[2].spec, request_for(items[2].spec, MELO))
    router = RouterConfig(escalate_to_melo=False, backends=("hook",))
    result = dispatch(engine, [items[0], forced], router, verify=False)
    assert result.failed == {
        "c": "back-end 'melo' is not enabled",
        "a": "hook: scripted refusal",
    }
    crashing = Scripted("hook", crash=True)
    result = dispatch(_engine(loaded, hook=crashing), items[:2], router, verify=False)
    assert set(result.failed) == {"a", "b"}
    assert result.failed["a"] == "hook apply raised RuntimeError: boom"
    assert crashing.held == []


def test_a_forget_whose_prompt_already_gives_its_target_withholds_nothing(
    loaded: LoadedModel,
) -> None:
    """Another forget of the subject already answers this prompt with the withheld
    answer: that is not an answer to withhold (checking it absent would fail the edit);
    the target itself is verified."""
    engine = _engine(loaded, melo=Scripted("melo"))
    prompt = "The capital of Zorland is"
    already = engine.greedy([prompt], engine.kinds.answer_tokens)[0]
    request = EditRequest(
        prompt=prompt, target=already, id="g", subject="Zorland", kind=EditKind.FORGET
    )
    item = DispatchItem(EditSpec("g", prompt, already, subject="Zorland"), request)
    result = dispatch(engine, [item], RouterConfig(default_backend="melo"), verify=True)
    assert result.withheld == {}
    assert result.applied == {"g": MELO}, result.failed
    assert result.verifications["g"].withheld is None
