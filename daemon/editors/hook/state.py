"""The hook editor's per-edit records, the running sums that follow from them, and the
(de)serialisation of its state.

Running sums
------------
A shard's sums at a layer are ``M = sum t k^T`` ``(d_out, d_in)`` and ``S = sum k k^T``
``(d_in, d_in)`` over the ``(k, t)`` rows of its live edits, in float64 on
``stats_device``. The solve (``solve.solve_layers``) adds a batch's rows with one
``LayerSums.plus``; a retraction takes an edit's rows out with ``LayerSums.minus``.
Since they are a function of the records (:class:`Record`), the persisted state
does not hold them: ``rebuild_sums`` recomputes them on load with the same
arithmetic, bit for bit as long as nothing was retracted (after a retraction the two
differ by float64 round-off) and the device and BLAS are the same.

Persisted state
---------------
The persisted state (version ``STATE_VERSION``) is a JSON manifest plus flat tensors:

- ``hook.{layer}.{buffer}``: each hook's buffers (the shard deltas ``delta.{s}``, or
  ``delta_up.{s}`` and ``delta_down.{s}`` for a factored shard; gate ``keys`` with
  ``key_shard``, ``key_mean``, ``key_std``, ``center``, thresholds);
- ``records.{layer}.keys`` / ``records.{layer}.outputs``: the ``(k, t)`` rows of
  every applied edit, in the manifest's record order (``sites`` rows each).

The shards' running sums ``M`` and ``S`` (:class:`LayerSums`) are not stored since
version 4: they follow from the records and, at ``(d_out + d_in) d_in`` float64 per
shard and layer, they dominated the state. ``load_sums`` rebuilds them
(``rebuild_sums``), adding each batch's rows to its shard in apply order with
``LayerSums.plus``'s arithmetic, the live editor's, so a state saved without
retractions reloads to bit-identical sums (on the same device and BLAS); after a
retraction (``LayerSums.minus`` on the live sums) the two differ by float64 round-off.
The shard count comes from the hooks' deltas, so a shard emptied by retraction gets
zero sums. Versions 2 and 3 stored the sums as ``sums.{layer}.moment`` ``(n_shards,
d_out, d_in)`` and ``sums.{layer}.key_outer`` ``(n_shards, d_in, d_in)``; they are
loaded as stored.

Everything else is stored as computed (float64 records, fp32 hook buffers), so a round
trip reproduces the logits bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daemon.editors.base import EditSpec
from daemon.errors import EditorStateError
from daemon.files import atomic_write, atomic_write_text

STATE_VERSION = 4
"""4: no stored sums, rebuilt from the records on load; 3: a shard's delta dense or as
two low-rank factors; 2: dense ``delta`` ``(n_shards, d_out, d_in)``, sharded sums,
per-key gate references (1: one delta, pooled reference)."""
READABLE_VERSIONS = (2, 3, 4)
STORED_SUMS = (2, 3)  # the versions that carry ``sums.*`` tensors
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


@dataclass
class Record:
    """One applied edit: its request, its shard and, per hook layer, its keys and targets."""

    spec: EditSpec
    fact: str
    batch: int
    shard: int
    keys: dict[int, torch.Tensor]  # layer -> (sites, d_in) float64
    outputs: dict[int, torch.Tensor]  # layer -> (sites, d_out) float64
    aliases: list[str] = field(default_factory=list)  # merged duplicates of this edit

    @property
    def sites(self) -> int:
        return int(next(iter(self.keys.values())).shape[0])


# --- running sums ---------------------------------------------------------------------


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


# --- the persisted state --------------------------------------------------------------


def records_manifest(records: Mapping[str, Record]) -> list[dict[str, Any]]:
    """The JSON part of the records (their tensors go to ``pack_tensors``)."""
    return [
        {
            "spec": {**asdict(r.spec), "rephrases": list(r.spec.rephrases)},
            "fact": r.fact,
            "batch": r.batch,
            "shard": r.shard,
            "sites": r.sites,
            "aliases": list(r.aliases),
        }
        for r in records.values()
    ]


def pack_tensors(
    buffers: Mapping[int, Mapping[str, torch.Tensor]],
    records: Mapping[str, Record],
    widths: Mapping[int, tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """Flat CPU tensors of the hooks' ``buffers`` and the records (no sums).

    ``widths`` gives ``(d_in, d_out)`` per layer (for empty record tensors).
    """
    out: dict[str, torch.Tensor] = {}
    recs = list(records.values())
    for layer, named in buffers.items():
        for name, value in named.items():
            out[f"hook.{layer}.{name}"] = value.detach().cpu().contiguous()
        d_in, d_out = widths[layer]
        f64 = torch.float64
        out[f"records.{layer}.keys"] = (
            torch.cat([r.keys[layer] for r in recs]).cpu()
            if recs
            else torch.zeros(0, d_in, dtype=f64)
        )
        out[f"records.{layer}.outputs"] = (
            torch.cat([r.outputs[layer] for r in recs]).cpu()
            if recs
            else torch.zeros(0, d_out, dtype=f64)
        )
    return out


def unpack_records(
    entries: Sequence[Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    device: torch.device,
) -> dict[str, Record]:
    """Records from the manifest ``entries`` and the tensors (KeyError/TypeError on damage)."""
    records: dict[str, Record] = {}
    start = 0
    for entry in entries:
        rows = slice(start, start + int(entry["sites"]))
        start = rows.stop
        spec_data = dict(entry["spec"])
        spec_data["rephrases"] = tuple(spec_data.get("rephrases", ()))
        spec = EditSpec(**spec_data)
        records[spec.edit_id] = Record(
            spec=spec,
            fact=str(entry["fact"]),
            batch=int(entry["batch"]),
            shard=int(entry["shard"]),
            keys={i: tensors[f"records.{i}.keys"][rows].to(device) for i in layers},
            outputs={i: tensors[f"records.{i}.outputs"][rows].to(device) for i in layers},
            aliases=[str(a) for a in entry.get("aliases", [])],
        )
    return records


def unpack_sums(
    tensors: Mapping[str, torch.Tensor], layer: int, device: torch.device
) -> list[LayerSums]:
    """The stored per-shard sums of ``layer`` (versions 2 and 3; KeyError when absent)."""
    moments = tensors[f"sums.{layer}.moment"].to(device, torch.float64)
    outers = tensors[f"sums.{layer}.key_outer"].to(device, torch.float64)
    if moments.dim() != 3 or moments.shape[0] != outers.shape[0]:
        raise ValueError(f"layer {layer}: sums of shape {tuple(moments.shape)} are not per shard")
    return [LayerSums(m.clone(), s.clone()) for m, s in zip(moments, outers, strict=True)]


def load_sums(
    version: int,
    tensors: Mapping[str, torch.Tensor],
    records: Iterable[Record],
    widths: Mapping[int, tuple[int, int]],
    n_shards: int,
    device: torch.device,
) -> dict[int, list[LayerSums]]:
    """A loaded state's sums per layer of ``widths``: as stored (``STORED_SUMS``
    versions) or rebuilt from the ``records`` into ``n_shards`` shards."""
    if version in STORED_SUMS:
        return {i: unpack_sums(tensors, i, device) for i in widths}
    return rebuild_sums(records, list(widths), n_shards, widths, device)


def hook_state(tensors: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The ``hook.{layer}.*`` tensors with the prefix removed."""
    prefix = f"hook.{layer}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_compatible(
    manifest: Mapping[str, Any],
    layers: Sequence[int],
    key_position: str,
    covariance_sha: Mapping[str, str],
) -> None:
    """Refuse a state made with other layers, key position or covariance statistics."""
    settings = manifest.get("settings", {})
    if (
        list(settings.get("layers", [])) != list(layers)
        or settings.get("key_position") != key_position
    ):
        raise EditorStateError(
            f"hook editor state was made with layers {settings.get('layers')} and keys at "
            f"{settings.get('key_position')}; this editor has {list(layers)} "
            f"and {key_position}"
        )
    if manifest.get("covariance_sha") != dict(covariance_sha):
        raise EditorStateError(
            "hook editor state was solved against other covariance statistics "
            "(a different model, text source or token budget)"
        )


def write_state(
    folder: Path, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """``tensors.safetensors`` plus ``manifest.json`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS, lambda p: save_file(dict(tensors), str(p)))
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def read_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What ``write_state`` wrote, version-checked; EditorStateError when unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as exc:
        raise EditorStateError(f"{folder}: cannot read the hook editor state: {exc}") from exc
    if manifest.get("version") not in READABLE_VERSIONS:
        raise EditorStateError(
            f"{folder}: hook editor state version {manifest.get('version')!r} "
            f"(this code reads {READABLE_VERSIONS})"
        )
    return manifest, tensors


def hook_buffers(hook: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A hook layer's own buffers (delta, gate keys, references), without the base module."""
    return {
        name: value.detach().clone()
        for name, value in hook.state_dict().items()
        if not name.startswith("base.")
    }


def tensor_sha(t: torch.Tensor) -> str:
    """A short content digest of a tensor (covariance statistics in the manifest)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
