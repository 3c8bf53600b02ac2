"""MEMIT's layer loop on one shard: spread the residual, solve each hook layer in turn.

Split out of :mod:`daemon.editors.hook.editor` (which describes the method); the
math itself is :mod:`daemon.editors.hook.math`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from daemon.editors.hook import math as hmath
from daemon.editors.hook.checks import guard_update
from daemon.editors.hook.keys import KeySites, capture
from daemon.editors.hook.layer import HookedProjection
from daemon.editors.hook.state import LayerSums


@dataclass(frozen=True)
class SolvePlan:
    """How one batch is solved: the hook layers (bottom-up) and the solve's constants."""

    layers: tuple[int, ...]
    cov_weight: float
    rounds: int
    max_update_norm_zscore: float


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
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Solve ``shard`` of every hook layer for the batch; returns per layer its keys and
    targets. Updates ``sums`` and the hooks' deltas in place; raises SolveError (from
    the solve or the collapse guard, which appends to ``history``)."""
    layers = plan.layers
    z = values.to(enc.input_ids.device, torch.float64)  # (sites, d_model)
    before = {layer: hooks[layer].delta[shard].double().clone() for layer in layers}
    keys: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    for _round in range(plan.rounds):
        for pos, layer in enumerate(layers):
            cap = capture(model, hooks, enc, [layer], layers[-1])
            k = cap.keys[layer].double()  # (sites, d_in)
            missing = z - cap.residual.double()  # (sites, d_model)
            share = hmath.spread_residual(missing, layer, len(layers) - pos)
            hook = hooks[layer]
            current = k @ hook.delta[shard].double().T  # (sites, d_out): the delta now
            t = current + share
            running = sums[layer][shard]
            if layer in keys:  # a later round replaces this batch's earlier terms
                old_k, old_t = keys[layer], outputs[layer]
                running = LayerSums(
                    running.moment - old_t.T @ old_k, running.key_outer - old_k.T @ old_k
                )
            new = LayerSums(running.moment + t.T @ k, running.key_outer + k.T @ k)
            solution = hmath.solve_from_sums(
                new.moment, new.key_outer, covariance[layer], plan.cov_weight
            )
            sums[layer][shard] = new
            hook.set_delta(solution.delta, shard)
            keys[layer], outputs[layer] = k, t
    for layer in layers:
        update = hooks[layer].delta[shard].double() - before[layer]
        guard_update(
            layer,
            float(torch.linalg.matrix_norm(update)) / w0_norm[layer],
            history[layer],
            plan.max_update_norm_zscore,
        )
    return keys, outputs


def zero_sums(hook: HookedProjection) -> LayerSums:
    """Empty running sums for one shard of ``hook`` (float64, on the hook's device)."""
    f64, device = torch.float64, hook.delta.device
    return LayerSums(
        torch.zeros(hook.d_out, hook.d_in, dtype=f64, device=device),
        torch.zeros(hook.d_in, hook.d_in, dtype=f64, device=device),
    )


def resolve_shards(
    hooks: Mapping[int, HookedProjection],
    sums: dict[int, list[LayerSums]],
    covariance: Mapping[int, torch.Tensor],
    cov_weight: float,
    shards: Sequence[int],
    live: Collection[int],
) -> None:
    """Solve ``shards`` of every hook again from ``sums`` after a retraction.

    A shard that holds no ``live`` edit any more is zeroed exactly; with no live
    shard at all every hook is reset to one empty shard.
    """
    if not live:
        for layer, hook in hooks.items():
            sums[layer] = [zero_sums(hook)]
            hook.reset()
        return
    for layer, hook in hooks.items():
        for shard in shards:
            if shard not in live:
                sums[layer][shard] = zero_sums(hook)
                hook.set_delta(torch.zeros(hook.d_out, hook.d_in), shard)
                continue
            solution = hmath.solve_from_sums(
                sums[layer][shard].moment,
                sums[layer][shard].key_outer,
                covariance[layer],
                cov_weight,
            )
            hook.set_delta(solution.delta, shard)
