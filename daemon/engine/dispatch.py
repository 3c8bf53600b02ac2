"""One batch of edits through the engine: route, apply, verify, retract, escalate.

The daemon's algorithm for turning edit requests into model edits, without a
store, so that the worker and the evaluation harness (editor ``auto``) run
exactly the same steps:

1. read, for each ``forget`` that does not name it, the answer the model gives its
   prompt now (what verification will check is gone, :mod:`daemon.engine.kinds`); an
   edit whose target is longer than ``[kinds] max_target_tokens`` fails;
   route each edit (``daemon.engine.router``); a request that names a disabled back-end
   fails;
2. per back-end, in the registry's dispatch order (hook first, then MELO with the
   hook's escalations), apply the edits and, when ``verify``, check every accepted one
   by greedy generation
   (``Engine.verify``); an edit that fails verification is retracted again;
3. an edit a back-end refuses or that fails verification there is escalated once
   (``router.escalation``: to the back-end's ``escalates_to``, hook to MELO); an edit
   that fails everywhere is failed with the reason (no retry: the same input fails the
   same way).

An editor may replace earlier edits on its own (the hook merges edits of one
fact: the earlier one is retracted inside ``apply``). Their ids are kept in the
edit's ``details["superseded"]`` even when the edit then fails verification
there, so the caller can tell which earlier edits left the model, and put them
back when the edit ends up applied nowhere.

Callers see each back-end step through :class:`DispatchHooks` (the worker records
a batch in the store and extends its leases there). Callers that need the whole
batch atomic for readers hold ``engine.lock`` around :func:`dispatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.config import RouterConfig
from daemon.editors.base import EditOutcome, EditSpec
from daemon.editors.registry import MELO, backend_names
from daemon.engine.engine import Engine, Verification
from daemon.engine.kinds import Expectation, answer_of, expectation, needs_answer
from daemon.engine.router import Route, escalation, route
from daemon.model.answers import continuation_matches
from daemon.model.batches import target_token_ids
from store.schema import Backend, EditKind, EditRequest

log = structlog.get_logger()


@dataclass(frozen=True)
class DispatchItem:
    """One edit: what the editor sees (``spec``) and what the router reads (``request``)."""

    spec: EditSpec
    request: EditRequest


@dataclass(frozen=True)
class Step:
    """One back-end's part of a batch: the edits it got, took and refused (with why);
    of the refused, those that failed verification and those escalated onwards."""

    backend: Backend
    edit_ids: tuple[str, ...]
    taken: Mapping[str, EditOutcome]
    refused: Mapping[str, str]
    unverified: frozenset[str] = frozenset()
    escalated: frozenset[str] = frozenset()


@dataclass
class DispatchResult:
    """Where every edit of a batch ended, and why (edit id keyed)."""

    applied: dict[str, Backend] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    escalated: list[str] = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)
    verifications: dict[str, Verification] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    withheld: dict[str, str] = field(default_factory=dict)


def _before_step(backend: Backend, edit_ids: Sequence[str]) -> None:
    return None


def _after_step(step: Step) -> None:
    return None


def _on_verification_failure(backend: Backend) -> None:
    return None


@dataclass(frozen=True)
class DispatchHooks:
    """Callbacks around each back-end step (all optional)."""

    before_step: Callable[[Backend, Sequence[str]], None] = _before_step
    after_step: Callable[[Step], None] = _after_step
    on_verification_failure: Callable[[Backend], None] = _on_verification_failure


def request_for(spec: EditSpec, backend: Backend = Backend.AUTO) -> EditRequest:
    """The request a client would have sent for ``spec`` (what the router reads)."""
    return EditRequest(
        prompt=spec.prompt,
        target=spec.target,
        id=spec.edit_id,
        subject=spec.subject,
        relation=spec.relation,
        rephrases=spec.rephrases,
        backend=backend,
    )


def dispatch(
    engine: Engine,
    items: Sequence[DispatchItem],
    router: RouterConfig,
    *,
    verify: bool,
    hooks: DispatchHooks | None = None,
) -> DispatchResult:
    """Route, apply, verify and escalate ``items`` (see the module doc)."""
    hooks = hooks or DispatchHooks()
    result = DispatchResult()
    items = _within_limits(engine, items, result)
    result.withheld.update(_answers_withheld(engine, items))
    expect = {
        i.spec.edit_id: expectation(i.request, result.withheld.get(i.spec.edit_id)) for i in items
    }
    specs = {item.spec.edit_id: item.spec for item in items}
    order = backend_names()
    waiting: dict[Backend, list[str]] = {b: [] for b in order}
    available = engine.backends
    melo = engine.editors.get(MELO)
    by_subject = melo is not None and melo.reads_subjects
    for item in items:
        edit_id = item.spec.edit_id
        chosen = route(item.request, router, engine.loaded.tokenizer, available, by_subject)
        result.routes[edit_id] = chosen
        if chosen.backend not in available:
            result.failed[edit_id] = f"back-end '{chosen.backend.value}' is not enabled"
        else:
            waiting[chosen.backend].append(edit_id)
    for backend in order:
        ids = waiting[backend]
        if not ids:
            continue
        hooks.before_step(backend, list(ids))
        taken, refused, unverified = _apply_verified(
            engine, backend, [specs[i] for i in ids], result, verify, hooks, expect
        )
        onwards: set[str] = set()
        for edit_id, outcome in taken.items():
            result.applied[edit_id] = backend
            _merge_details(result.details.setdefault(edit_id, {}), outcome.details)
        for edit_id, reason in refused.items():
            nxt = escalation(backend, router, available)
            if nxt is not None and edit_id not in result.escalated:
                result.escalated.append(edit_id)
                onwards.add(edit_id)
                waiting[nxt].append(edit_id)
                result.details.setdefault(edit_id, {})["escalated_from"] = {
                    "backend": backend.value,
                    "reason": reason,
                }
            else:
                result.failed[edit_id] = reason
        hooks.after_step(
            Step(backend, tuple(ids), taken, refused, frozenset(unverified), frozenset(onwards))
        )
    return result


def _within_limits(
    engine: Engine, items: Sequence[DispatchItem], result: DispatchResult
) -> list[DispatchItem]:
    """The items whose target fits ``[kinds] max_target_tokens``; the others fail."""
    limit = engine.kinds.max_target_tokens
    kept = []
    for item in items:
        spec = item.spec
        n = len(target_token_ids(engine.loaded.tokenizer, spec.prompt, spec.target))
        if n > limit:
            result.failed[spec.edit_id] = (
                f"the target is {n} tokens long; edits may teach at most {limit} "
                "([kinds] max_target_tokens)"
            )
        else:
            kept.append(item)
    return kept


def _answers_withheld(engine: Engine, items: Sequence[DispatchItem]) -> dict[str, str]:
    """For each ``forget``, the answer it withholds: the request's ``target_true``, or
    the model's greedy answer to its prompt now (none when the model gives none, or
    gives the forget's own target already)."""
    out = {
        i.spec.edit_id: i.request.target_true
        for i in items
        if i.request.kind is EditKind.FORGET and i.request.target_true
    }
    ask = [i for i in items if needs_answer(i.request)]
    if ask:
        said = engine.greedy([i.request.prompt for i in ask], engine.kinds.answer_tokens)
        for item, continuation in zip(ask, said, strict=True):
            answer = answer_of(continuation)
            # an answer that is already the withheld one (another forget of the same
            # subject covers this prompt) withholds nothing: the target is checked
            if answer and not continuation_matches(continuation, item.spec.target):
                out[item.spec.edit_id] = " " + answer
    return out


def _merge_details(into: dict[str, Any], details: Mapping[str, Any]) -> None:
    """``into.update(details)``, except that the ``superseded`` lists are joined."""
    earlier = list(into.get("superseded", []))
    into.update(details)
    if earlier:
        into["superseded"] = list(dict.fromkeys([*earlier, *details.get("superseded", [])]))


def _apply_verified(
    engine: Engine,
    backend: Backend,
    specs: Sequence[EditSpec],
    result: DispatchResult,
    verify: bool,
    hooks: DispatchHooks,
    expect: Mapping[str, Expectation],
) -> tuple[dict[str, EditOutcome], dict[str, str], list[str]]:
    """Apply on ``backend`` and verify; failed edits are retracted again. Returns the
    taken edits, the refused ones with why, and which of those failed verification
    (the earlier edits those replaced stay listed in ``result.details``)."""
    verifications = result.verifications
    try:
        outcomes = engine.apply(backend, specs)
    except Exception as exc:  # the editor's own guarantees: refused edits leave no trace
        log.exception("backend_apply_crashed", backend=backend.value)
        engine.retract(backend, [s.edit_id for s in specs])
        reason = f"{backend.value} apply raised {type(exc).__name__}: {exc}"
        return {}, {s.edit_id: reason for s in specs}, []
    taken = {o.edit_id: o for o in outcomes if o.accepted}
    refused = {o.edit_id: f"{backend.value}: {o.reason}" for o in outcomes if not o.accepted}
    bad: list[str] = []
    if verify and taken:
        checked = engine.verify([s for s in specs if s.edit_id in taken], expect)
        verifications.update(checked)
        bad = [e for e, v in checked.items() if not v.passed]
        if bad:
            engine.retract(backend, bad)
            for edit_id in bad:
                replaced = taken[edit_id].details.get("superseded", [])
                if replaced:
                    _merge_details(result.details.setdefault(edit_id, {}), {"superseded": replaced})
                hooks.on_verification_failure(backend)
                out = checked[edit_id].prompt_output
                refused[edit_id] = f"{backend.value}: verification failed (greedy output {out!r})"
                del taken[edit_id]
    return taken, refused, bad
