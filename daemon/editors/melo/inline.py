"""Routing decided inside the request's own forward pass: no separate key forward.

Computing a request's keys up front (``KeyReader``) runs the model's layers up to
the key layer once more before the real forward: on the small fact world (key
layer 2 of 4, batch of 32) 18 ms of a 25 ms forward. Since the key layer lies
below every LoRA layer, the real forward computes the very same hidden states
before any LoRA layer reads its routes. :class:`InlineRouter` uses them:

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.melo.index import NeuronIndex
from daemon.editors.melo.routing import PendingRoutes, pending_routes, route_later
from daemon.model import arch
from daemon.model.kv_cache import is_prefill

Lookup = Callable[
    [NeuronIndex, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[int | None]
]
"""``(index, hidden [B, T, d], input_ids [B, T], starts [B], ends [B])`` -> each row's
block: the key layer's output, the tokens, and where each row's prompt starts and ends
in them (inclusive)."""
UpFront = Callable[[NeuronIndex, Sequence[str]], list[int | None]]


class _Pending(PendingRoutes):
    """Pending routes of one request, tied to the router and index snapshot that decide them."""

    def __init__(
        self, router: InlineRouter, index: NeuronIndex, prompts: Sequence[str], up_front: UpFront
    ) -> None:
        super().__init__(prompts, lambda ps: up_front(index, ps))
        self.router = router
        self.index = index


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
        with route_later(_Pending(self, index, prompts, self._up_front)):
            yield

    def _mine(self) -> _Pending | None:
        pending = pending_routes()
        if isinstance(pending, _Pending) and pending.router is self:
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
