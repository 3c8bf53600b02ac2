"""Which back-end applies an edit: the routing policy, in one place.

Rules, in order:

1. A request that names a back-end (``"backend": "melo" | "hook"``) gets it.
2. ``"auto"`` means ``[router] default_backend``; when that is ``melo`` or
   ``hook`` the edit goes there.
3. Otherwise (auto/auto): a subject-bearing factual edit whose target is short
   (at most ``hook_max_target_tokens`` tokens) goes to the hook back-end, whose
   keys are read at the subject and whose closed-form update suits one short
   object; everything else (no subject, long targets, free text) goes to MELO,
   which trains a LoRA block on any prompt/target pair.

A back-end that is not available in this daemon is never chosen for ``auto``;
an explicit request for it is routed anyway and fails with a clear reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from daemon.config import RouterConfig
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
    available: Collection[Backend] = (Backend.MELO, Backend.HOOK),
) -> Route:
    """The back-end for ``request`` under ``config`` (see the module rules)."""
    if request.backend is not Backend.AUTO:
        return Route(request.backend, "requested by the client")
    default = Backend(config.default_backend)
    if default is not Backend.AUTO:
        return Route(default, "router.default_backend")
    hook_ok = Backend.HOOK in available
    if not request.subject:
        return Route(Backend.MELO, "no subject: MELO")
    n_tokens = len(target_token_ids(tokenizer, request.prompt, request.target))
    if n_tokens > config.hook_max_target_tokens:
        return Route(
            Backend.MELO,
            f"target is {n_tokens} tokens (> {config.hook_max_target_tokens}): MELO",
        )
    if not hook_ok:
        return Route(Backend.MELO, "hook back-end unavailable: MELO")
    return Route(Backend.HOOK, "subject-bearing edit with a short target: hook")


def escalation(
    current: Backend, config: RouterConfig, available: Collection[Backend]
) -> Backend | None:
    """Where an edit that failed verification on ``current`` is retried, if anywhere."""
    if current is Backend.HOOK and config.escalate_to_melo and Backend.MELO in available:
        return Backend.MELO
    return None
