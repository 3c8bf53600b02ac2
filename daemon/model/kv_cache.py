"""The key/value cache across transformers versions: which forward is a prefill, and
how editd's own token loop hands a cache back to the model.

transformers has changed how a cache travels more than once inside the 5.x range
editd supports: up to 5.23 ``generate`` passes ``past_key_values`` (and some
versions ``cache_position``); from 5.25 it passes ``cache`` and no
``cache_position``, and ``past_key_values`` is a deprecated alias due to go in
5.40. A static cache also reports its length differently from a dynamic one. Code
that asks "is this a decode step?" by looking at the cache object therefore breaks
with each release; the hook's subject scope did (under 5.25 every decode step
looked like a prefill).

:func:`past_length` decides it from the forward's *position ids* first: a causal
LM's position ids count the real tokens before each token, so a forward whose
largest position id is at least its own width continues earlier tokens, and a
prefill's never is (left padding only lowers a row's positions). ``generate``
derives position ids from the attention mask for every model family and every
cache class, and editd's own token loop (:mod:`daemon.engine.completions`) passes them
itself. Only a forward without position ids falls back to ``cache_position``, to
a 2-D attention mask wider than the input, and last to whatever cache object it
carries under either name (duck-typed on ``get_seq_length``, never on its class).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values")  # the names, newest first


def past_length(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """How many tokens a forward with these arguments continues (0: a prefill).

    ``args``/``kwargs`` are what a forward pre-hook registered ``with_kwargs=True``
    receives. The first signal present decides (see the module docstring).
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    width = _width(ids, kwargs.get("inputs_embeds"))
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.numel() and width:
        return max(0, int(positions.max()) + 1 - width)
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and width:
        return max(0, int(mask.shape[-1]) - width)
    for name in CACHE_KWARGS:
        length = getattr(kwargs.get(name), "get_seq_length", None)
        if callable(length):
            return int(length())
    return 0


def is_prefill(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a forward starts its sequences (no earlier tokens in a cache)."""
    return past_length(args, kwargs) == 0


def _width(ids: Any, embeds: Any) -> int:
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return int(ids.shape[1])
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 3:
        return int(embeds.shape[1])
    return 0


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a cache (``cache`` in newer
    transformers, ``past_key_values`` before)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return CACHE_KWARGS[1]
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[1])


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` or ``output.past_key_values``)."""
    for name in CACHE_KWARGS:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def continuation_inputs(
    model: nn.Module, input_ids: torch.Tensor, cache: Any, past: int
) -> dict[str, Any]:
    """Forward keywords for ``input_ids`` (B, T) continuing ``past`` cached tokens of
    an unpadded batch: the cache under the model's own keyword, explicit position ids
    (``past .. past + T - 1``) and a full attention mask."""
    width = int(input_ids.shape[1])
    positions = torch.arange(past, past + width, device=input_ids.device).expand_as(input_ids)
    mask = torch.ones((input_ids.shape[0], past + width), dtype=torch.long, device=input_ids.device)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": positions,
        cache_kwarg(model): cache,
        "use_cache": True,
    }
