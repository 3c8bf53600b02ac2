"""MEMIT's layer loop on one shard, and the two refusals after a solve.

``solve_layers`` spreads the residual and solves each hook layer in turn;
``resolve_shards`` solves shards again after a retraction. After a batch's solve,
``guard_update`` (the collapse guard) and ``check_recall`` (the gate recall check)
may refuse it: both raise :class:`~daemon.errors.SolveError`, and the editor then
rolls the batch back. :mod:`daemon.editors.hook.editor` describes the method; the
math itself is :mod:`daemon.editors.hook.math`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from daemon.editors.base import EditSpec
from daemon.editors.hook import math as hmath
from daemon.editors.hook.deltas import frobenius, use_factors
from daemon.editors.hook.keys import KeySites, capture
from daemon.editors.hook.layer import HookedProjection
from daemon.editors.hook.state import LayerSums, empty_sums
from daemon.errors import SolveError
from daemon.model.partial import record_block_output, replaying


@dataclass(frozen=True)
class SolvePlan:
    """How one batch is solved: the hook layers (bottom-up) and the solve's constants."""

    layers: tuple[int, ...]
    cov_weight: float
    rounds: int
    max_update_norm_zscore: float


ShardRows = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""``(layer, shard) -> (keys (n, d_in), outputs (n, d_out))``: the rows of the live edits
of a shard at a layer (float64, where the sums live), for the factored solve."""


def set_shard(
    hook: HookedProjection,
    shard: int,
    sums: LayerSums,
    keys: torch.Tensor,
    outputs: torch.Tensor,
    cov: torch.Tensor,
    cov_weight: float,
) -> None:
    """Solve ``shard`` of ``hook`` from its ``sums`` and set its delta: as two factors
    while its rows ``keys`` ``(r, d_in)`` / ``outputs`` ``(r, d_out)`` (those the sums
    hold) are few enough (``deltas.use_factors``), dense otherwise."""
    if use_factors(int(keys.shape[0]), hook.d_out, hook.d_in):
        factors = hmath.solve_factors(keys.T, outputs.T, sums.key_outer, cov, cov_weight)
        hook.set_factors(factors.up, factors.down, shard)
    else:
        solution = hmath.solve_from_sums(sums.moment, sums.key_outer, cov, cov_weight)
        hook.set_delta(solution.delta, shard)


def solve_layers(
    model: nn.Module,
    hooks: Mapping[int, HookedProjection],
    enc: KeySites,
    values: torch.Tensor,
    shard: int,
    plan: SolvePlan,
    sums: dict[int, list[LayerSums]],
    covariance: Mapping[int, torch.Tensor],
    w0_norm: Mapping[int, float],
    history: Mapping[int, list[float]],
    rows: ShardRows,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Solve ``shard`` of every hook layer for the batch; returns per layer its keys and
    targets (float64, on the sums' device). Replaces ``sums`` entries and the hooks'
    shard deltas (never writes into them); raises SolveError (from the solve or the
    collapse guard, which appends to ``history``). ``rows``: the shard's earlier rows.

    Every round adds its terms to the shard's sums from before the batch (one
    ``plus``), so the sums after the batch are exactly those ``state.rebuild_sums``
    computes from the batch's records."""
    layers = plan.layers
    z = values.to(enc.input_ids.device, torch.float64)  # (sites, d_model)
    before = {layer: hooks[layer].deltas[shard] for layer in layers}  # immutable
    base = {layer: sums[layer][shard] for layer in layers}  # immutable: before the batch
    earlier = {layer: rows(layer, shard) for layer in layers}
    keys: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    with _lower_blocks_replayed(model, enc, layers[0]):
        for _round in range(plan.rounds):
            for pos, layer in enumerate(layers):
                cap = capture(model, hooks, enc, [layer], layers[-1])
                k = cap.keys[layer].double()  # (sites, d_in)
                missing = z - cap.residual.double()  # (sites, d_model)
                share = hmath.spread_residual(missing, layer, len(layers) - pos)
                hook = hooks[layer]
                t = hook.shard_output(k, shard) + share  # (sites, d_out): the delta now + share
                k, t = k.to(base[layer].moment.device), t.to(base[layer].moment.device)
                new = base[layer].plus(k, t)  # a later round replaces the batch's terms exactly
                old_k, old_t = earlier[layer]
                all_k, all_t = torch.cat([old_k.to(k), k]), torch.cat([old_t.to(t), t])
                sums[layer][shard] = new
                set_shard(hook, shard, new, all_k, all_t, covariance[layer], plan.cov_weight)
                keys[layer], outputs[layer] = k, t
    for layer in layers:
        update = frobenius(hooks[layer].deltas[shard], before[layer])
        guard_update(layer, update / w0_norm[layer], history[layer], plan.max_update_norm_zscore)
    return keys, outputs


@contextmanager
def _lower_blocks_replayed(model: nn.Module, enc: KeySites, first: int) -> Iterator[None]:
    """The blocks below the first hook layer hold no hook, so their output for the batch
    is the same in every capture of the loop: record it once and replay it."""
    if first == 0:
        yield
        return
    recorded = record_block_output(model, first - 1, **enc.forward_inputs(), use_cache=False)
    with replaying(model, first - 1, recorded):
        yield


def zero_sums(hook: HookedProjection, device: torch.device | str) -> LayerSums:
    """Empty running sums for one shard of ``hook`` (float64, on ``device``)."""
    return empty_sums(hook.d_in, hook.d_out, device)


def resolve_shards(
    hooks: Mapping[int, HookedProjection],
    sums: dict[int, list[LayerSums]],
    covariance: Mapping[int, torch.Tensor],
    cov_weight: float,
    shards: Sequence[int],
    live: Collection[int],
    rows: ShardRows,
) -> None:
    """Solve ``shards`` of every hook again from ``sums`` after a retraction.

    A shard that holds no ``live`` edit any more is zeroed exactly; with no live
    shard at all every hook is reset to one empty shard.
    """
    device = covariance[next(iter(hooks))].device if hooks else torch.device("cpu")
    if not live:
        for layer, hook in hooks.items():
            sums[layer] = [zero_sums(hook, device)]
            hook.reset()
        return
    for layer, hook in hooks.items():
        for shard in shards:
            if shard not in live:
                sums[layer][shard] = zero_sums(hook, device)
                hook.set_factors(torch.zeros(hook.d_out, 0), torch.zeros(0, hook.d_in), shard)
                continue
            k, t = rows(layer, shard)
            set_shard(hook, shard, sums[layer][shard], k, t, covariance[layer], cov_weight)


# --- refusals after a solve -----------------------------------------------------------


def check_recall(
    model: PreTrainedModel,
    hooks: Mapping[int, HookedProjection],
    batch: Sequence[EditSpec],
    enc: KeySites,
    shard: int,
) -> None:
    """Raise SolveError unless the gate routes every key site of the batch to ``shard``."""
    model(**enc.forward_inputs(), use_cache=False)
    for layer, hook in hooks.items():
        route = hook.last_route
        got = route[enc.rows, enc.positions] if route is not None else torch.full_like(enc.rows, -1)
        missed = sorted({batch[int(e)].edit_id for e in enc.owner[got != shard].tolist()})
        if missed:
            raise SolveError(
                f"layer {layer}: the scope gate does not route {len(missed)} edit(s) of "
                f"the batch to their shard {shard} (gate recall check): {missed[:5]}",
                layer=layer,
                edit_ids=missed,
            )


GUARD_MIN_HISTORY = 20
"""Batches a layer must have taken before the collapse guard judges one.

Against a short, tight history an ordinary batch early in a stream looks like an
outlier; a longer history lets those through while later real jumps are still
refused (the measurements are in BENCHMARKS.md)."""


def guard_update(layer: int, update: float, history: list[float], max_zscore: float) -> None:
    """Refuse an update norm (``||update|| / ||W0||``) that is an outlier against this
    layer's ``history`` (once it holds ``GUARD_MIN_HISTORY`` batches; a non-finite
    norm always); otherwise append it to the history."""
    if hmath.is_outlier(update, history, max_zscore, min_history=GUARD_MIN_HISTORY):
        raise SolveError(
            f"layer {layer}: the batch's update norm {update:.4g} x ||W0|| is an outlier "
            f"against the last {len(history)} batches (collapse guard)",
            layer=layer,
            update_norm_ratio=update,
        )
    history.append(update)
