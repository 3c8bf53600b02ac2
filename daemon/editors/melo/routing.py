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
(:class:`PendingRoutes`, set by :func:`route_later`): the editor's
:class:`InlineRouter` fills them in once the key layer has run, before any LoRA
layer above it reads them. A layer that reads routes still pending gets them from
the pending routes' fallback, which computes them up front.

That saves a separate key forward: computing a request's keys up front
(``KeyReader``) runs the model's layers up to the key layer once more before the
real forward. Since the key layer lies below every LoRA layer, the real forward
computes the very same hidden states before any LoRA layer reads its routes.
:class:`InlineRouter` uses them:

1. ``routing(prompts, index)`` enters ``route_later`` with pending routes.
2. A forward pre-hook on the model, at the context's first forward (the prefill),
   finds each row's last PROMPT token: the prompt's tokens, as ``KeyReader``
   tokenizes them, must start at the row's first real (mask 1) token, with
   position ids counting 0, 1, ... from there and an empty KV cache. That is the
   layout ``generate`` and the probes use (left padding, position ids from the
   mask), and a prompt + target batch padded either side. Then the hidden state
   at that token is exactly what ``KeyReader`` reads (causal attention, pads
   masked), up to float rounding between batch shapes.
3. A forward hook on the key layer's block hands the layer's output and each
   row's prompt span (first and last token) to the editor's lookup, which reads the
   keys there (the last token, or every prompt token for subject keys), looks them
   up in the index snapshot taken when the context was entered, and freezes the
   routes for the rest of the context (the KV-cached decode steps).

When the batch does not fit step 2 (other tokens, other positions, a cache
already filled, ``inputs_embeds``), the pre-hook computes the routes up front
with ``KeyReader`` instead, before the forward starts: the old behaviour.

Note: a new ``threading.Thread`` starts with an empty context, so routes set in
one thread never leak into another; a worker thread must enter ``route_rows``
itself (or be started through ``contextvars.copy_context().run``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.melo.index import NeuronIndex
from daemon.model import arch
from daemon.model.kv_cache import is_prefill

RowRoutes = tuple[int | None, ...]
"""One entry per batch row: the block id the row is routed to, or None for the base model."""
Lookup = Callable[
    [NeuronIndex, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[int | None]
]
"""``(index, hidden [B, T, d], input_ids [B, T], starts [B], ends [B])`` -> each row's
block: the key layer's output, the tokens, and where each row's prompt starts and ends
in them (inclusive)."""
UpFront = Callable[[NeuronIndex, Sequence[str]], list[int | None]]


class PendingRoutes:
    """A request's routes, decided by its first forward pass rather than up front.

    ``prompts`` are the request's prompts (one per batch row), tied to the ``router``
    and the ``index`` snapshot that decide them; ``routes`` stays None until
    :meth:`decide` sets it, after which every forward of the context reuses it. The
    fallback, ``up_front(index, prompts)``, computes the routes up front:
    :meth:`resolve` uses it when routes are read before any forward decided them.
    """

    def __init__(
        self, router: InlineRouter, index: NeuronIndex, prompts: Sequence[str], up_front: UpFront
    ) -> None:
        self.router = router
        self.index = index
        self.prompts = tuple(prompts)
        self.routes: RowRoutes | None = None
        # [B] index of each row's last prompt token in the first forward (set when armed)
        self.key_positions: torch.Tensor | None = None
        # [B] index of each row's first prompt token in the first forward (set when armed)
        self.key_starts: torch.Tensor | None = None
        # [B, T] the first forward's input ids (set when armed)
        self.key_ids: torch.Tensor | None = None
        self._up_front = up_front

    def decide(self, blocks: Sequence[int | None]) -> RowRoutes:
        """Freeze the routes (checked like ``route_rows``); later calls keep the first."""
        if self.routes is None:
            self.routes = _checked(blocks)
        return self.routes

    def resolve(self) -> RowRoutes:
        """The routes, computed by the fallback if no forward decided them yet."""
        if self.routes is None:
            self.decide(self._up_front(self.index, self.prompts))
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


# --- routes decided in the request's own prefill ---------------------------------------


class InlineRouter:
    """Hooks that route each request from the key layer's output of its own prefill."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        key_layer: int,
        *,
        lookup: Lookup,
        up_front: UpFront,
    ) -> None:
        self.tokenizer = tokenizer
        self._lookup = lookup
        self._up_front = up_front
        self._handles = [
            model.register_forward_pre_hook(self._arm, with_kwargs=True),
            arch.layer_block(model, key_layer).register_forward_hook(self._decide),
        ]

    def close(self) -> None:
        """Remove both hooks."""
        for handle in self._handles:
            handle.remove()

    @contextmanager
    def routing(self, prompts: Sequence[str], index: NeuronIndex) -> Iterator[None]:
        """Route ``prompts`` (one per batch row) by ``index``, decided in the first forward."""
        with route_later(PendingRoutes(self, index, prompts, self._up_front)):
            yield

    def _mine(self) -> PendingRoutes | None:
        pending = pending_routes()
        if pending is not None and pending.router is self:
            return pending
        return None

    def _arm(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pending = self._mine()
        if pending is None:  # no context, or routes already decided
            return
        spans = self._key_positions(pending.prompts, args, kwargs)
        if spans is None:
            pending.resolve()  # up front, as before: this batch's layout is not the keys'
        else:
            pending.key_starts, pending.key_positions = spans
            pending.key_ids = kwargs.get("input_ids", args[0] if args else None)

    def _decide(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        pending = self._mine()
        if (
            pending is None
            or pending.key_positions is None
            or pending.key_starts is None
            or pending.key_ids is None
        ):
            return
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, d]
        device = hidden.device
        pending.decide(
            self._lookup(
                pending.index,
                hidden.detach(),
                pending.key_ids,
                pending.key_starts.to(device),
                pending.key_positions.to(device),
            )
        )

    def _key_positions(
        self, prompts: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's first and last prompt token ``([B], [B])``; None when the batch's
        layout is not the keys'."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or len(prompts) != ids.shape[0]:
            return None
        if not is_prefill(args, kwargs):
            return None
        width = ids.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            return None
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = kwargs.get("cache_position")
        if positions is None:
            positions = torch.arange(width)
        if not isinstance(positions, torch.Tensor) or positions.shape[-1] != width:
            return None
        if positions.dim() == 2 and positions.shape[0] not in (1, ids.shape[0]):
            return None
        positions = positions.expand(ids.shape[0], width)
        rows: list[list[int]] = self.tokenizer(list(prompts))["input_ids"]
        ends = _prompt_ends(rows, ids.tolist(), mask.tolist(), positions.tolist())
        if ends is None:
            return None
        return ends - torch.tensor([len(r) for r in rows], dtype=torch.long) + 1, ends


def _prompt_ends(
    prompts: list[list[int]],
    ids: list[list[int]],
    mask: list[list[int]],
    positions: list[list[int]],
) -> torch.Tensor | None:
    """Index of each prompt's last token in its row, or None if a row does not hold it.

    A row holds its prompt when the prompt's tokens start at the row's first real
    token, are all real, and have position ids 0 .. len - 1.
    """
    ends: list[int] = []
    for prompt, row, row_mask, row_pos in zip(prompts, ids, mask, positions, strict=True):
        start = next((i for i, m in enumerate(row_mask) if m), None)
        if not prompt or start is None:
            return None
        end = start + len(prompt)
        if (
            end > len(row)
            or row[start:end] != prompt
            or not all(row_mask[start:end])
            or row_pos[start:end] != list(range(len(prompt)))
        ):
            return None
        ends.append(end - 1)
    return torch.tensor(ends, dtype=torch.long)
