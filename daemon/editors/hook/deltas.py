"""One shard's delta, dense or as two low-rank factors, and its serialisation.

A shard's closed-form delta ``M (lambda C + S)^-1`` has rank at most the number
``r`` of key rows it was solved from: with the rows' outputs ``T`` ``(d_out, r)``
and keys ``K`` ``(d_in, r)``, ``M = T K^T`` and so::

    delta = T (A^-1 K)^T = up @ down,   up (d_out, r), down (r, d_in)

Two factors take ``r (d_out + d_in)`` numbers against ``d_out d_in`` dense, so a
shard is stored factored while ``r < d_out d_in / (d_out + d_in)`` (``use_factors``)
and dense otherwise. A :class:`ShardDelta` is immutable: the hook replaces a shard's
delta, never writes into it, so a batch's rollback can keep the old object.

In a state dict a shard ``s`` is ``delta.{s}`` (dense) or ``delta_up.{s}`` plus
``delta_down.{s}`` (factored); ``delta`` ``(n_shards, d_out, d_in)`` is the dense
layout of hook state version 2, still read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

DENSE, UP, DOWN = "delta", "delta_up", "delta_down"
ENTRY_NAMES = frozenset({DENSE, UP, DOWN})
"""The first dotted part of every state-dict entry this module writes or reads."""


def use_factors(rank: int, d_out: int, d_in: int) -> bool:
    """Whether ``rank`` factors are smaller than the dense ``(d_out, d_in)`` matrix."""
    return rank * (d_out + d_in) < d_out * d_in


def _multiply(up: torch.Tensor, down: torch.Tensor) -> bool:
    return up.dim() == 2 and down.dim() == 2 and up.shape[1] == down.shape[0]


@dataclass(frozen=True, eq=False)
class ShardDelta:
    """A shard's fp32 delta: ``dense`` ``(d_out, d_in)``, else ``up @ down``."""

    dense: torch.Tensor | None = None  # (d_out, d_in)
    up: torch.Tensor | None = None  # (d_out, r)
    down: torch.Tensor | None = None  # (r, d_in)

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.up is None or self.down is None):
            raise ValueError("a shard delta is either dense or two factors")
        up, down = self.up, self.down
        if up is not None and down is not None and not _multiply(up, down):
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not multiply")

    @classmethod
    def zero(cls, d_out: int, d_in: int, device: torch.device | str) -> ShardDelta:
        """The empty delta: factors of rank 0."""
        f32 = torch.float32
        return cls(
            up=torch.zeros(d_out, 0, dtype=f32, device=device),
            down=torch.zeros(0, d_in, dtype=f32, device=device),
        )

    @property
    def factored(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int:
        """The factors' inner width (``min(d_out, d_in)`` taken as dense rank)."""
        if self.down is not None:
            return int(self.down.shape[0])
        assert self.dense is not None
        return int(min(self.dense.shape))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.dense, self.up, self.down) if t is not None]

    def nonzero(self) -> bool:
        """Whether the delta can change an output (factors: both non-zero)."""
        if self.dense is not None:
            return bool(self.dense.any())
        assert self.up is not None and self.down is not None
        return self.rank > 0 and bool(self.up.any()) and bool(self.down.any())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ delta.T``: ``(n, d_in)`` -> ``(n, d_out)`` in ``x``'s dtype."""
        if self.dense is not None:
            return x @ self.dense.to(x.dtype).T
        assert self.up is not None and self.down is not None
        return (x @ self.down.to(x.dtype).T) @ self.up.to(x.dtype).T  # (n, r) -> (n, d_out)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(d_out, d_in)`` matrix (materialised for factors)."""
        if self.dense is not None:
            return self.dense.to(dtype)
        assert self.up is not None and self.down is not None
        return self.up.to(dtype) @ self.down.to(dtype)

    def to(self, device: torch.device | str) -> ShardDelta:
        return ShardDelta(*(None if t is None else t.to(device) for t in self._parts()))

    def _parts(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.dense, self.up, self.down


def _factors64(delta: ShardDelta) -> tuple[torch.Tensor, torch.Tensor]:
    assert delta.up is not None and delta.down is not None
    return delta.up.double(), delta.down.double()


def frobenius(delta: ShardDelta, minus: ShardDelta | None = None) -> float:
    """``||delta - minus||_F`` in float64 (``minus`` None: ``||delta||_F``).

    Factored deltas never materialise ``d_out x d_in``: with the difference written
    as ``U D`` (factors side by side), ``||U D||_F^2 = sum((U^T U) * (D D^T))``.
    """
    if minus is None and delta.factored:
        up, down = _factors64(delta)
    elif minus is not None and delta.factored and minus.factored:
        (up_a, down_a), (up_b, down_b) = _factors64(delta), _factors64(minus)
        up = torch.cat([up_a, -up_b.to(up_a.device)], dim=1)  # (d_out, ra + rb)
        down = torch.cat([down_a, down_b.to(down_a.device)], dim=0)  # (ra + rb, d_in)
    else:
        dense = delta.to_dense(torch.float64)
        if minus is not None:
            dense = dense - minus.to_dense(torch.float64).to(dense.device)
        return float(torch.linalg.matrix_norm(dense))
    square = float(((up.T @ up) * (down @ down.T)).sum())  # (r, r) Gram matrices
    return float(max(square, 0.0) ** 0.5)


def key_values(
    keys: torch.Tensor, key_shard: torch.Tensor, deltas: Sequence[ShardDelta]
) -> torch.Tensor:
    """Each stored key's output through its own shard, ``keys[j] @ delta[shard_j].T``:
    ``(m, d_out)`` in ``keys``' dtype (the subject gate's snapped values)."""
    d_out = deltas[0].tensors()[0].shape[0]
    values = keys.new_zeros(keys.shape[0], d_out)
    for s in sorted(set(key_shard.tolist())):
        rows = (key_shard == s).nonzero().squeeze(1)
        values.index_copy_(0, rows, deltas[s].apply(keys.index_select(0, rows)))
    return values


def state_entries(deltas: Sequence[ShardDelta]) -> dict[str, torch.Tensor]:
    """The state-dict entries of a hook's shard deltas (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for s, delta in enumerate(deltas):
        if delta.dense is not None:
            out[f"{DENSE}.{s}"] = delta.dense
        else:
            assert delta.up is not None and delta.down is not None
            out[f"{UP}.{s}"] = delta.up
            out[f"{DOWN}.{s}"] = delta.down
    return out


def from_entries(
    entries: Mapping[str, torch.Tensor], device: torch.device | str
) -> list[ShardDelta] | None:
    """Shard deltas from state-dict ``entries`` (prefix removed); None when there are none.

    Reads both layouts: ``delta.{s}`` / ``delta_up.{s}`` + ``delta_down.{s}`` and the
    version-2 stack ``delta`` ``(n_shards, d_out, d_in)``. Raises ValueError on a gap.
    """
    f32 = torch.float32
    legacy = entries.get(DENSE)
    if legacy is not None:
        if legacy.dim() != 3:
            raise ValueError(f"delta of shape {tuple(legacy.shape)} is not per shard")
        return [ShardDelta(dense=d.to(device, f32).clone()) for d in legacy]
    shards = sorted({int(k.split(".", 1)[1]) for k in entries if k.split(".", 1)[0] in ENTRY_NAMES})
    if not shards:
        return None
    if shards != list(range(len(shards))):
        raise ValueError(f"shard deltas {shards} are not 0..{len(shards) - 1}")
    deltas = []
    for s in shards:
        dense = entries.get(f"{DENSE}.{s}")
        up, down = entries.get(f"{UP}.{s}"), entries.get(f"{DOWN}.{s}")
        if dense is not None:
            deltas.append(ShardDelta(dense=dense.to(device, f32).clone()))
        elif up is not None and down is not None:
            deltas.append(
                ShardDelta(up=up.to(device, f32).clone(), down=down.to(device, f32).clone())
            )
        else:
            raise ValueError(f"shard {s}: neither a dense delta nor both factors")
    return deltas
