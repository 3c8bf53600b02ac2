"""The hook editor's running sums per shard and layer, and how they follow from the records.

A shard's sums at a layer are ``M = sum t k^T`` ``(d_out, d_in)`` and ``S = sum k k^T``
``(d_in, d_in)`` over the ``(k, t)`` rows of its live edits, in float64 on
``stats_device``. The solve (``solve.solve_layers``) adds a batch's rows with one
``LayerSums.plus``; a retraction takes an edit's rows out with ``LayerSums.minus``.
Since they are a function of the records (``state.Record``), the persisted state
does not hold them: ``rebuild_sums`` recomputes them on load with the same
arithmetic, bit for bit as long as nothing was retracted (after a retraction the two
differ by float64 round-off) and the device and BLAS are the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from daemon.editors.hook.state import Record


@dataclass(frozen=True)
class LayerSums:
    """One shard's running sums at one layer: ``M = sum t k^T`` and ``S = sum k k^T``.

    Never written into: a change makes new sums (``plus``/``minus``), so an edit
    batch's rollback keeps the old object instead of a copy.
    """

    moment: torch.Tensor  # (d_out, d_in) float64
    key_outer: torch.Tensor  # (d_in, d_in) float64

    def plus(self, keys: torch.Tensor, outputs: torch.Tensor) -> LayerSums:
        """With the rows ``keys`` ``(n, d_in)`` and ``outputs`` ``(n, d_out)`` added."""
        k, t = keys.to(self.moment), outputs.to(self.moment)
        return LayerSums(self.moment + t.T @ k, self.key_outer + k.T @ k)

    def minus(self, keys: torch.Tensor, outputs: torch.Tensor) -> LayerSums:
        """With the rows ``keys`` and ``outputs`` taken out (undoes ``plus`` up to
        float64 round-off)."""
        k, t = keys.to(self.moment), outputs.to(self.moment)
        return LayerSums(self.moment - t.T @ k, self.key_outer - k.T @ k)


def empty_sums(d_in: int, d_out: int, device: torch.device | str) -> LayerSums:
    """Zero running sums for one shard at a layer of widths ``d_in``, ``d_out`` (float64)."""
    f64 = torch.float64
    return LayerSums(
        torch.zeros(d_out, d_in, dtype=f64, device=device),
        torch.zeros(d_in, d_in, dtype=f64, device=device),
    )


def rebuild_sums(
    records: Iterable[Record],
    layers: Sequence[int],
    n_shards: int,
    widths: Mapping[int, tuple[int, int]],
    device: torch.device | str,
) -> dict[int, list[LayerSums]]:
    """Every layer's ``n_shards`` running sums from the ``records`` (in apply order).

    Each batch's rows, concatenated in record order, are added to its shard's sums
    batch after batch with ``LayerSums.plus``'s arithmetic (``M + t^T k``, ``S + k^T k``),
    as the live editor added them, but into one accumulator per shard rather than a
    new matrix per batch (faster, the same bits). A shard without records keeps
    zero sums. ``widths``: ``(d_in, d_out)`` per layer; the sums are float64 on
    ``device``. ValueError for a record outside ``0..n_shards-1`` or a batch across shards.
    """
    batches: dict[int, list[Record]] = {}  # batch -> its records, in record order
    for r in records:
        if not 0 <= r.shard < n_shards:
            raise ValueError(f"edit {r.spec.edit_id!r}: shard {r.shard} of {n_shards}")
        batches.setdefault(r.batch, []).append(r)
    for batch, held in batches.items():
        if len({r.shard for r in held}) != 1:
            raise ValueError(f"batch {batch} spans shards {sorted({r.shard for r in held})}")
    sums: dict[int, list[LayerSums]] = {}
    for layer in layers:
        shards = [empty_sums(*widths[layer], device) for _ in range(n_shards)]
        for batch in sorted(batches):
            held = batches[batch]
            k = torch.cat([r.keys[layer] for r in held]).to(device, torch.float64)  # (n, d_in)
            t = torch.cat([r.outputs[layer] for r in held]).to(device, torch.float64)
            acc = shards[held[0].shard]  # a fresh object nobody else holds yet
            acc.moment.add_(t.T @ k)  # (d_out, d_in)
            acc.key_outer.add_(k.T @ k)  # (d_in, d_in)
        sums[layer] = shards
    return sums


def shard_rows(
    records: Iterable[Record],
    layer: int,
    shard: int,
    widths: tuple[int, int],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys ``(n, d_in)`` and outputs ``(n, d_out)`` of ``shard``'s ``records`` at
    ``layer`` in record order (empty float64 tensors on ``device`` when it has none)."""
    held = [r for r in records if r.shard == shard]
    if not held:
        (d_in, d_out), f64 = widths, torch.float64
        return (
            torch.zeros(0, d_in, dtype=f64, device=device),
            torch.zeros(0, d_out, dtype=f64, device=device),
        )
    return torch.cat([r.keys[layer] for r in held]), torch.cat([r.outputs[layer] for r in held])
