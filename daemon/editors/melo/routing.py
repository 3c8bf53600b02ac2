"""Per-request routing of batch rows to MELO LoRA blocks, carried in a context variable.

A request's route is decided once, from its prompt (the neuron index looks up the
prompt's key), and then frozen for every forward pass of that request: prefill and
each one-token decode step read the same routes, whatever the sequence length.

The routes live in a :class:`contextvars.ContextVar`, never in a module global or
on the model, so two requests served concurrently from different threads (or
asyncio tasks) each see only their own routes, and one batched generation can
send each row to a different block (or to none). Outside any ``route_rows``
context every row runs the unmodified base model.

    with route_rows([3, None]):      # row 0 -> block 3, row 1 -> base model
        model.generate(**batch, use_cache=True)

Routes may also be decided DURING the request's first forward pass
(:class:`PendingRoutes`, set by :func:`route_later`): the editor's in-forward
router fills them in once the key layer has run, before any LoRA layer above it
reads them (see ``inline``). A layer that reads routes still pending gets them
from the pending routes' fallback, which computes them up front.

Note: a new ``threading.Thread`` starts with an empty context, so routes set in
one thread never leak into another; a worker thread must enter ``route_rows``
itself (or be started through ``contextvars.copy_context().run``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

RowRoutes = tuple[int | None, ...]
"""One entry per batch row: the block id the row is routed to, or None for the base model."""


class PendingRoutes:
    """A request's routes, decided by its first forward pass rather than up front.

    ``prompts`` are the request's prompts (one per batch row); ``routes`` stays None
    until :meth:`decide` sets it, after which every forward of the context reuses
    it. ``fallback(prompts)`` computes the routes up front: :meth:`resolve` uses it
    when routes are read before any forward decided them.
    """

    def __init__(
        self, prompts: Sequence[str], fallback: Callable[[Sequence[str]], Sequence[int | None]]
    ) -> None:
        self.prompts = tuple(prompts)
        self.routes: RowRoutes | None = None
        # [B] index of each row's last prompt token in the first forward (set when armed)
        self.key_positions: torch.Tensor | None = None
        # [B] index of each row's first prompt token in the first forward (set when armed)
        self.key_starts: torch.Tensor | None = None
        # [B, T] the first forward's input ids (set when armed)
        self.key_ids: torch.Tensor | None = None
        self._fallback = fallback

    def decide(self, blocks: Sequence[int | None]) -> RowRoutes:
        """Freeze the routes (checked like ``route_rows``); later calls keep the first."""
        if self.routes is None:
            self.routes = _checked(blocks)
        return self.routes

    def resolve(self) -> RowRoutes:
        """The routes, computed by the fallback if no forward decided them yet."""
        if self.routes is None:
            self.decide(self._fallback(self.prompts))
        assert self.routes is not None
        return self.routes


_ROUTES: ContextVar[RowRoutes | PendingRoutes | None] = ContextVar("melo_row_routes", default=None)


def current_routes() -> RowRoutes | None:
    """The routes of the request running in this context, or None outside ``route_rows``."""
    value = _ROUTES.get()
    if isinstance(value, PendingRoutes):
        return value.resolve()
    return value


def pending_routes() -> PendingRoutes | None:
    """The routes still to be decided in this context (inside ``route_later``), else None."""
    value = _ROUTES.get()
    if isinstance(value, PendingRoutes) and value.routes is None:
        return value
    return None


def _checked(blocks: Sequence[int | None]) -> RowRoutes:
    routes: RowRoutes = tuple(blocks)
    for b in routes:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise ValueError(f"block ids must be non-negative ints or None, got {b!r}")
    return routes


@contextmanager
def route_later(pending: PendingRoutes) -> Iterator[PendingRoutes]:
    """Route the rows by ``pending``, whose routes the first forward pass decides."""
    token = _ROUTES.set(pending)
    try:
        yield pending
    finally:
        _ROUTES.reset(token)


@contextmanager
def route_rows(blocks: Sequence[int | None]) -> Iterator[RowRoutes]:
    """Route batch row ``i`` to ``blocks[i]`` (None: base model) for every forward inside.

    Nested contexts replace the outer routes and restore them on exit. Block ids
    must be non-negative ints; the layer checks them against its capacity and the
    number of routes against the batch size.
    """
    routes = _checked(blocks)
    token = _ROUTES.set(routes)
    try:
        yield routes
    finally:
        _ROUTES.reset(token)
