"""``auto`` as an evaluation editor: the daemon's routing, verification and escalation.

:class:`RoutedEditor` is an :class:`~daemon.editors.base.Editor` over an
:class:`~daemon.engine.engine.Engine` holding every enabled back-end (``[router]
backends``, each built from its ``[editors.*]`` section as the daemon builds it).
Its ``apply`` is the worker's algorithm, ``daemon.engine.dispatch``: route each edit,
apply per back-end, verify by greedy generation (``[worker] verify``), retract
failures and escalate them once. :class:`RoutingTally` counts where edits went.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, cast

from daemon.config import Config, RouterConfig
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.registry import HOOK, MELO
from daemon.engine.dispatch import DispatchItem, DispatchResult, dispatch, request_for
from daemon.engine.engine import Engine, build_editor
from daemon.engine.kinds import spec_for
from daemon.model.loading import LoadedModel
from store.schema import Backend, EditRequest

STATE_VERSION = 1


@dataclass
class RoutingTally:
    """Where the edits of a stream went, counted over every dispatched batch.

    ``routed``: the router's first choice per back-end; ``applied``: the back-end
    holding the edit in the end; ``escalated``: edits retried on another back-end
    (after a refusal or a failed verification); ``failed``: edits no back-end took.
    """

    routed: dict[str, int] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)
    escalated: int = 0
    failed: int = 0

    def add(self, result: DispatchResult) -> None:
        for chosen in result.routes.values():
            key = chosen.backend.value
            self.routed[key] = self.routed.get(key, 0) + 1
        for backend in result.applied.values():
            self.applied[backend.value] = self.applied.get(backend.value, 0) + 1
        self.escalated += len(result.escalated)
        self.failed += len(result.failed)

    def to_json_dict(self) -> dict[str, Any]:
        names = [b.value for b in (HOOK, MELO)]
        return {
            "routed": {n: self.routed.get(n, 0) for n in names},
            "applied": {n: self.applied.get(n, 0) for n in names},
            "escalated": self.escalated,
            "failed": self.failed,
        }


class RoutedEditor:
    """The daemon's ``auto`` back-end choice, as one editor (see the module doc)."""

    name = "auto"

    @property
    def reads_subjects(self) -> bool:
        """Whether the back-end that takes facts reads its keys at the subject."""
        return any(e.reads_subjects for e in self.engine.editors.values())

    def __init__(self, engine: Engine, router: RouterConfig, *, verify: bool) -> None:
        self.engine = engine
        self.router = router
        self.verify = verify
        self.tally = RoutingTally()

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        """Dispatch as the daemon does ``"backend": "auto"`` requests."""
        return self.apply_routed([(spec, Backend.AUTO) for spec in edits])

    def apply_routed(self, edits: Sequence[tuple[EditSpec, Backend]]) -> list[EditOutcome]:
        """Dispatch specs with the back-end each request names (``auto``: the router's)."""
        items = [DispatchItem(spec, request_for(spec, backend)) for spec, backend in edits]
        with self.engine.lock:
            result = dispatch(self.engine, items, self.router, verify=self.verify)
        self.tally.add(result)
        return [self._outcome(spec.edit_id, result) for spec, _ in edits]

    @staticmethod
    def _outcome(edit_id: str, result: DispatchResult) -> EditOutcome:
        details: dict[str, Any] = {
            "route": result.routes[edit_id].backend.value,
            **result.details.get(edit_id, {}),
        }
        backend = result.applied.get(edit_id)
        if backend is None:
            return EditOutcome(edit_id, False, reason=result.failed.get(edit_id), details=details)
        return EditOutcome(edit_id, True, details={**details, "backend": backend.value})

    def retract(self, edit_ids: Sequence[str]) -> None:
        for backend, held in self.engine.applied_ids().items():
            mine = [e for e in edit_ids if e in set(held)]
            if mine:
                self.engine.retract(backend, mine)

    def applied_ids(self) -> list[str]:
        return [e for ids in self.engine.applied_ids().values() for e in ids]

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return self.engine.routing(prompts)

    def state_dict(self) -> dict[str, Any]:
        with self.engine.lock:
            editors = {b.value: e.state_dict() for b, e in self.engine.editors.items()}
        return {"version": STATE_VERSION, "editors": editors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported auto editor state version {state.get('version')!r}")
        with self.engine.lock:
            for name, editor_state in state["editors"].items():
                self.engine.editor(Backend(name)).load_state_dict(editor_state)


def build_routed_editor(
    loaded: LoadedModel, config: Config, *, calibration_prompts: Sequence[str] = ()
) -> RoutedEditor:
    """An Engine with every back-end of ``[router] backends``, wrapped for the harness
    (``calibration_prompts``: as the daemon gives its editors, its drift probes)."""

    editors: dict[Backend, Editor] = {
        Backend(name): build_editor(name, loaded, config, calibration_prompts=calibration_prompts)
        for name in config.router.backends
    }
    return RoutedEditor(
        Engine(loaded, editors, config.kinds), config.router, verify=config.worker.verify
    )


@dataclass
class SequenceOutcome:
    """What :func:`apply_in_sequence` did: where each edit went, what failed and why."""

    results: list[DispatchResult]
    applied_by: dict[str, int]
    failed: dict[str, str]
    seconds: float

    @property
    def applied(self) -> int:
        return sum(self.applied_by.values())

    def seconds_per_edit(self) -> float:
        n = self.applied + len(self.failed)
        return round(self.seconds / max(1, n), 2)


def apply_in_sequence(
    engine: Engine,
    requests: Sequence[EditRequest],
    router: RouterConfig,
    *,
    batch_size: int = 1,
    verify: bool = True,
) -> SequenceOutcome:
    """Apply ``requests`` (any kind) through the daemon's dispatch, ``batch_size`` at a
    time, as the worker does with requests from the queue."""
    t0 = time.perf_counter()
    results = []
    applied: Counter[str] = Counter()
    failed: dict[str, str] = {}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        items = []
        for request in chunk:
            assert request.id is not None
            items.append(DispatchItem(spec_for(request.id, request, engine.kinds), request))
        result = dispatch(engine, items, router, verify=verify)
        applied.update(b.value for b in result.applied.values())
        failed.update(result.failed)
        results.append(result)
    return SequenceOutcome(results, dict(applied), failed, time.perf_counter() - t0)


def retract_all(engine: Engine, requests: Sequence[EditRequest]) -> None:
    """Retract every one of ``requests`` from whichever back-end holds it."""
    ids = [r.id for r in requests if r.id is not None]
    for backend in engine.backends:
        engine.retract(backend, ids)


class _EngineRouting:
    """An engine's routing where the scoring helpers take an editor (they only route)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return self.engine.routing(prompts)


def routing_of(engine: Engine) -> Editor:
    """``engine``'s routing as an :class:`Editor` for the scoring helpers (perplexity,
    teacher-forced scores), which call nothing but ``routing``."""
    return cast(Editor, _EngineRouting(engine))


def target_likelihoods(
    engine: Engine, prompts: Sequence[str], targets: Sequence[str]
) -> list[float]:
    """Each target's likelihood given its prompt, per token (``exp(-mean NLL)``),
    teacher forced under the engine's routing: the probability view of a generation."""
    if not prompts:
        return []
    from daemon.eval.scoring import teacher_forced_accuracies
    from daemon.model.batches import target_nll

    loaded = engine.loaded
    with engine.lock:
        nll = teacher_forced_accuracies(
            routing_of(engine), loaded.model, loaded.tokenizer, prompts, targets, per_row=target_nll
        )
    return [math.exp(-x) for x in nll]
