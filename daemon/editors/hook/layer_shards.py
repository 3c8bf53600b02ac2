"""The hook layer's shard deltas: the list of per-shard fp32 deltas and the edits to it.

:class:`ShardDeltasMixin` is the part of
:class:`~daemon.editors.hook.layer.HookedProjection` that keeps its deltas; the
projection's ``__init__`` sets the attributes it declares, its forward pass
applies them and its ``state_dict`` persists them
(:func:`daemon.editors.hook.deltas.state_entries`).

Shards
------
``deltas`` holds one :class:`~daemon.editors.hook.deltas.ShardDelta` per shard
(``d_out x d_in``, dense or as two low-rank factors; immutable, replaced on every
change): the editor fills one shard with a bounded
number of edit keys (a linear map from ``d_in`` cannot hold many more facts than
``d_in`` keys) and then opens the next. Every stored key carries its shard
(``key_shard``); a token that the gate lets through gets the delta of the shard of
its nearest eligible key, so each shard is a closed-form solve over its own keys.
"""

from __future__ import annotations

import torch

from daemon.editors.hook.deltas import ShardDelta


class ShardDeltasMixin:
    """The shard list of a hook layer and its edits (``HookedProjection`` sets the state)."""

    d_in: int
    d_out: int
    _device: torch.device
    deltas: list[ShardDelta]  # replaced on every change, never written into
    _delta_version: int  # bumped on every change of ``deltas`` (gate tables)
    _has_delta: bool  # any shard nonzero

    @property
    def n_shards(self) -> int:
        return len(self.deltas)

    @property
    def delta(self) -> torch.Tensor:
        """Every shard's delta, dense ``(n_shards, d_out, d_in)`` fp32 (materialised:
        for tests and diagnostics, never on the forward path)."""
        return torch.stack([d.to_dense() for d in self.deltas])

    def shard_output(self, x: torch.Tensor, shard: int) -> torch.Tensor:
        """``x @ delta[shard].T`` for rows ``x`` ``(n, d_in)``, in ``x``'s dtype."""
        return self.deltas[self._shard_index(shard)].apply(x.to(self._device))

    def _as_delta(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        if tuple(delta_out_in.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"delta shape {tuple(delta_out_in.shape)} does not match the projection's "
                f"[out, in] = [{self.d_out}, {self.d_in}]"
            )
        if not bool(torch.isfinite(delta_out_in).all()):
            raise ValueError("delta holds non-finite values (NaN/inf)")
        return delta_out_in.detach().to(device=self._device, dtype=torch.float32)

    def _shard_index(self, shard: int) -> int:
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} outside 0..{self.n_shards - 1}")
        return shard

    def _set_deltas(self, deltas: list[ShardDelta]) -> None:
        """Replace the shard list (never written into: a rollback may hold the old one)."""
        self.deltas = deltas
        self._delta_version += 1
        self._has_delta = any(d.nonzero() for d in deltas)

    def _replace(self, shard: int, delta: ShardDelta) -> None:
        s = self._shard_index(shard)
        self._set_deltas([*self.deltas[:s], delta, *self.deltas[s + 1 :]])

    @torch.no_grad()
    def add_shard(self) -> int:
        """Open a new, empty shard; returns its index."""
        zero = ShardDelta.zero(self.d_out, self.d_in, self._device)
        self._set_deltas([*self.deltas, zero])
        return self.n_shards - 1

    @torch.no_grad()
    def set_delta(self, delta_out_in: torch.Tensor, shard: int = 0) -> None:
        """Replace one shard's delta (``[out, in]``, any float dtype; stored fp32)."""
        self._replace(shard, ShardDelta(dense=self._as_delta(delta_out_in)))

    @torch.no_grad()
    def set_factors(self, up: torch.Tensor, down: torch.Tensor, shard: int = 0) -> None:
        """Replace one shard's delta by ``up @ down``: ``(d_out, r)`` and ``(r, d_in)``
        (any float dtype; stored fp32)."""
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not multiply")
        if up.shape[0] != self.d_out or down.shape[1] != self.d_in:
            raise ValueError(
                f"factors give [{up.shape[0]}, {down.shape[1]}], not the projection's "
                f"[out, in] = [{self.d_out}, {self.d_in}]"
            )
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise ValueError("delta factors hold non-finite values (NaN/inf)")
        f32 = torch.float32
        self._replace(
            shard,
            ShardDelta(
                up=up.detach().to(self._device, f32), down=down.detach().to(self._device, f32)
            ),
        )

    @torch.no_grad()
    def add_delta(self, delta_out_in: torch.Tensor, shard: int = 0) -> None:
        """Add an ``[out, in]`` update to one shard's delta (summed in float64, stored fp32)."""
        s = self._shard_index(shard)
        add = delta_out_in.detach().to(device=self._device, dtype=torch.float64)
        self.set_delta(self.deltas[s].to_dense(torch.float64) + add, s)
