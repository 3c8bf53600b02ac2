"""The subject gate's second test: a token against its sequence's candidate keys only.

:mod:`daemon.editors.hook.scope` decides, per request, which stored keys are
candidates for which row (the edits whose subject the row names); this module
scores a hook layer's tokens against those keys alone. Key ``j`` fires for a token
with centred unit key ``x`` where::

    cos(x, k_j) > reach_j = max(key_mean_j + z * key_std_j, subject_cos_floor)

(the z rule of :mod:`daemon.editors.hook.gate` with the subject gate's own floor,
folded into one threshold per key; NaN references never fire), and among the
firing candidates the largest cosine wins (the lowest candidate column on ties).

Cost: everything that depends only on the request's candidates and the layer's
keys (the gathered unit keys, their thresholds, shards and, with snapping, their
values ``keys[j] @ delta[shard_j].T``) is a :class:`CandidateTable`, built once per
request and layer and reused at every KV-cached decode step; a forward then costs
one batched matmul against each row's few candidate keys. A request without any
candidate costs nothing; a decode step reuses the table of its prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEVER = float("inf")


def key_reach(
    key_mean: torch.Tensor, key_std: torch.Tensor, limit: float, cos_floor: float
) -> torch.Tensor:
    """The least centred cosine at which each key fires ``(m,)`` float32 (inf: never)."""
    reach = torch.clamp(key_mean.double() + limit * key_std.double(), min=cos_floor)
    return torch.nan_to_num(reach, nan=_NEVER).float()


def key_values(keys: torch.Tensor, key_shard: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each stored key's output through its own shard, ``keys[j] @ delta[shard_j].T``:
    ``(m, d_out)`` float32."""
    values = keys.new_zeros(keys.shape[0], delta.shape[1])
    for s in sorted(set(key_shard.tolist())):
        rows = (key_shard == s).nonzero().squeeze(1)
        values.index_copy_(0, rows, keys.index_select(0, rows) @ delta[s].T)
    return values


@dataclass(frozen=True)
class CandidateTable:
    """One hook layer's view of one request's candidates.

    Each row's ``K`` candidate keys are gathered once (a batched matmul against a few
    keys per row is ~4x cheaper than one matmul against all the batch's distinct
    candidates); padding columns and rows without candidates have an infinite
    threshold. ``shard`` and ``values`` are per stored key.
    """

    keys: torch.Tensor  # (B, K, d_in) centred unit keys of each row's candidates
    reach: torch.Tensor  # (B, 1, K) firing threshold (inf for padding)
    key: torch.Tensor  # (B, K) stored key row of each candidate (0 for padding)
    shard: torch.Tensor  # (m,) shard of every stored key
    values: torch.Tensor | None  # (m, d_out) snapped output of every stored key, or None


def candidate_table(
    candidates: torch.Tensor,
    keys_n: torch.Tensor,
    reach: torch.Tensor,
    key_shard: torch.Tensor,
    values: torch.Tensor | None,
) -> CandidateTable | None:
    """The table of ``candidates`` ``(B, K)`` (stored key rows, -1: padding); None when no
    row has a candidate. ``keys_n``, ``reach``, ``key_shard``, ``values``: per stored key."""
    valid = candidates >= 0
    if not bool(valid.any()):
        return None
    key = candidates.clamp(min=0)
    batch, k = key.shape
    return CandidateTable(
        keys=keys_n.index_select(0, key.reshape(-1)).view(batch, k, -1),
        reach=torch.where(valid, reach[key], _NEVER).unsqueeze(1),
        key=key,
        shard=key_shard,
        values=values,
    )


def route_table(
    x: torch.Tensor, center: torch.Tensor, table: CandidateTable, causal: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fire, winner)`` ``(B, T)`` for the tokens ``x`` ``(B, T, d_in)``.

    ``fire``: some candidate fires; ``winner``: the winning candidate's stored key row
    (meaningless where nothing fires). ``causal`` ``(B, T, K)`` (None: all active)
    limits a token to the candidates whose subject ends at or before it. A token
    whose centred key is zero never fires. Pure function.
    """
    xc = x.float() - center  # (B, T, d_in)
    dot = torch.bmm(xc, table.keys.transpose(1, 2))  # (B, T, K): cosine times ||xc||
    ok = dot > table.reach * torch.linalg.vector_norm(xc, dim=-1, keepdim=True)  # cos > reach
    if causal is not None:
        ok = ok & causal
    best, nearest = torch.where(ok, dot, -_NEVER).max(dim=-1)  # the largest cosine wins
    return best > -_NEVER, table.key.gather(1, nearest)


def routes_of(table: CandidateTable, fire: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Shard per token ``(B, T)`` (-1: closed) from :func:`route_table`'s result."""
    return torch.where(fire, table.shard[winner], -1)


def add_values(
    out: torch.Tensor, table: CandidateTable, fire: torch.Tensor, winner: torch.Tensor
) -> torch.Tensor:
    """``out`` ``(B, T, d_out)`` plus the winning candidate's value where a key fires
    (float32, cast back; untouched elsewhere, bit for bit)."""
    assert table.values is not None
    new = (out.float() + table.values[winner]).to(out.dtype)
    return torch.where(fire.unsqueeze(-1), new, out)
