"""The hook editor's per-edit records and the (de)serialisation of its state.

The persisted state (version ``STATE_VERSION``) is a JSON manifest plus flat tensors:

- ``hook.{layer}.{buffer}``: each hook's buffers (the shard deltas ``delta.{s}``, or
  ``delta_up.{s}`` and ``delta_down.{s}`` for a factored shard; gate ``keys`` with
  ``key_shard``, ``key_mean``, ``key_std``, ``center``, thresholds);
- ``records.{layer}.keys`` / ``records.{layer}.outputs``: the ``(k, t)`` rows of
  every applied edit, in the manifest's record order (``sites`` rows each).

The shards' running sums ``M`` and ``S`` (``sums.LayerSums``) are not stored since
version 4: they follow from the records and, at ``(d_out + d_in) d_in`` float64 per
shard and layer, they dominated the state. ``load_sums`` rebuilds them
(``sums.rebuild_sums``), adding each batch's rows to its shard in apply order with
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
from daemon.editors.hook.sums import LayerSums, rebuild_sums
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
