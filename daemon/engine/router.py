"""Which back-end applies an edit: the routing policy, in one place.

Rules, in order:

1. A request that names a back-end (``"backend": "melo"``, ``"hook"`` or any name in
   :mod:`daemon.editors.registry`) gets it.
2. ``"auto"`` means ``[router] default_backend``; when that names a back-end the edit
   goes there.
3. Otherwise (auto/auto), by what the back-ends' keys reach:
   - an edit without a subject, or with a long target (more than
     ``hook_max_target_tokens`` tokens), goes to MELO, which trains a LoRA block on
     any prompt/target pair;
   - a subject-bearing edit with a short target goes to MELO when MELO reads its keys
     at the subject (``[editors.melo] key_position = "subject_last"``, the default),
     and to the hook when MELO's keys are prompt-last (BENCHMARKS.md has the real-model
     measurements behind this rule: with prompt-last keys MELO reaches almost no
     paraphrase, so the hook's subject keys are the better home for a fact).

A back-end that is not available in this daemon is never chosen for ``auto`` (the
first available one in dispatch order is, with the reason saying so); an explicit
request for it is routed anyway and fails with a clear reason.

Escalation: an edit that fails verification on a back-end is retried on the
back-end its registry entry names in ``escalates_to`` (the hook's is MELO), when
``[router] escalate_to_melo`` is on and that back-end is available.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from daemon.config import RouterConfig
from daemon.editors.registry import HOOK, MELO, backend_names, entry
from daemon.model.batches import target_token_ids
from store.schema import Backend, EditRequest


@dataclass(frozen=True)
class Route:
    """The chosen back-end and why (kept in the edit's result for the audit trail)."""

    backend: Backend
    reason: str


def route(
    request: EditRequest,
    config: RouterConfig,
    tokenizer: PreTrainedTokenizerBase,
    available: Collection[Backend] = (MELO, HOOK),
    melo_reads_subjects: bool = False,
) -> Route:
    """The back-end for ``request`` under ``config`` (see the module rules);
    ``melo_reads_subjects``: MELO's keys are read at the subject (its editor's
    ``reads_subjects``)."""
    if request.backend is not Backend.AUTO:
        return Route(request.backend, "requested by the client")
    default = Backend(config.default_backend)
    if default is not Backend.AUTO:
        return Route(default, "router.default_backend")
    chosen = _auto(request, config, tokenizer, melo_reads_subjects)
    if chosen.backend in available:
        return chosen
    for other in backend_names():
        if other in available:
            return Route(other, f"{chosen.backend.value} back-end unavailable: {other.value}")
    return chosen


def _auto(
    request: EditRequest,
    config: RouterConfig,
    tokenizer: PreTrainedTokenizerBase,
    melo_reads_subjects: bool,
) -> Route:
    if not request.subject:
        return Route(MELO, "no subject: MELO")
    n_tokens = len(target_token_ids(tokenizer, request.prompt, request.target))
    if n_tokens > config.hook_max_target_tokens:
        return Route(
            MELO,
            f"target is {n_tokens} tokens (> {config.hook_max_target_tokens}): MELO",
        )
    if melo_reads_subjects:
        return Route(MELO, "subject-bearing edit, MELO keys at the subject: MELO")
    return Route(HOOK, "subject-bearing edit with a short target: hook")


def escalation(
    current: Backend, config: RouterConfig, available: Collection[Backend]
) -> Backend | None:
    """Where an edit that failed verification on ``current`` is retried, if anywhere."""
    here = entry(current)
    onwards = here.escalates_to
    if not config.escalate_to_melo or onwards is None or onwards not in available:
        return None
    if entry(onwards).order <= here.order:  # dispatch has passed it: nowhere to go
        return None
    return onwards
