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

Note: a new ``threading.Thread`` starts with an empty context, so routes set in
one thread never leak into another; a worker thread must enter ``route_rows``
itself (or be started through ``contextvars.copy_context().run``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

RowRoutes = tuple[int | None, ...]
"""One entry per batch row: the block id the row is routed to, or None for the base model."""

_ROUTES: ContextVar[RowRoutes | None] = ContextVar("melo_row_routes", default=None)


def current_routes() -> RowRoutes | None:
    """The routes of the request running in this context, or None outside ``route_rows``."""
    return _ROUTES.get()


@contextmanager
def route_rows(blocks: Sequence[int | None]) -> Iterator[RowRoutes]:
    """Route batch row ``i`` to ``blocks[i]`` (None: base model) for every forward inside.

    Nested contexts replace the outer routes and restore them on exit. Block ids
    must be non-negative ints; the layer checks them against its capacity and the
    number of routes against the batch size.
    """
    routes: RowRoutes = tuple(blocks)
    for b in routes:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise ValueError(f"block ids must be non-negative ints or None, got {b!r}")
    token = _ROUTES.set(routes)
    try:
        yield routes
    finally:
        _ROUTES.reset(token)
