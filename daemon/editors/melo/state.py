"""MELO editor state: the in-memory state dict and its on-disk form (safetensors + JSON).

The state dict (``MeloEditor.state_dict``) holds JSON-able values plus arrays:

* ``"version"``, ``"editor"``, ``"settings"`` (layers, key layer, capacity, rank,
  key dim: a state only loads into an editor built the same way), ``"radius"``;
* ``"table"``: ``BlockTable.to_state()``; ``"edits"``: the applied specs in order;
* ``"index"``: ``NeuronIndex.to_state()`` (a manifest plus numpy arrays) or None;
* ``"blocks"``: ``{"block<b>.<module>.lora_A": tensor, ...}`` for every live block,
  a flat dict of CPU tensors ready for safetensors;
* ``"prompt_keys"``: ``(N, d)`` float32 tensor, the key of each applied edit's
  prompt in applied order (used to find edits a new key may re-route).

On disk (``save_state``/``load_state``) a directory holds ``tensors-<gen>.safetensors``
(blocks, prompt keys, the index's arrays) and ``manifest.json`` (format version,
generation, everything else). Each file is written atomically and the manifest
LAST, naming its generation's tensor file, so a reader (or a restart after a
crash mid-save) sees either the old state or the new one; older generations are
removed after the manifest is in place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from safetensors.torch import load_file, save_file

from daemon.editors.base import EditSpec
from daemon.editors.melo.allocator import BlockTable
from daemon.editors.melo.index import NeuronIndex
from daemon.errors import EditorStateError, NeuronIndexError
from daemon.files import atomic_write, atomic_write_text

STATE_VERSION = 1
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_INDEX_ARRAYS = ("keys", "centres", "faiss")
_INDEX_PREFIX = "index."
_PROMPT_KEYS = "prompt_keys"

log = structlog.get_logger()


# --- edit specs ------------------------------------------------------------------------


def spec_to_dict(spec: EditSpec) -> dict[str, Any]:
    out = asdict(spec)
    out["rephrases"] = list(spec.rephrases)
    return out


def spec_from_dict(data: Mapping[str, Any]) -> EditSpec:
    try:
        return EditSpec(
            edit_id=str(data["edit_id"]),
            prompt=str(data["prompt"]),
            target=str(data["target"]),
            subject=data.get("subject"),
            relation=data.get("relation"),
            rephrases=tuple(str(r) for r in data.get("rephrases", ())),
            reach=data.get("reach", "subject"),  # states before reach existed: subject
            whole_reply=bool(data.get("whole_reply", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EditorStateError(f"melo state holds a malformed edit spec: {exc}") from exc


# --- block tensor names ------------------------------------------------------------------


def block_key(block: int, name: str) -> str:
    """The state-dict key of one block tensor: ``block<b>.<module name>.lora_A``."""
    return f"block{block}.{name}"


def split_block_key(key: str) -> tuple[int, str]:
    head, _, rest = key.partition(".")
    if not head.startswith("block") or not head[5:].isdigit() or not rest:
        raise EditorStateError(f"melo state has a malformed block tensor name '{key}'")
    return int(head[5:]), rest


# --- files ---------------------------------------------------------------------------


def _as_tensor(array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu").contiguous()
    return torch.from_numpy(np.ascontiguousarray(array))


def save_state(state: Mapping[str, Any], directory: Path | str) -> Path:
    """Write ``state`` into ``directory`` (created if needed); return the manifest path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    generation = uuid.uuid4().hex[:12]
    tensors = {key: _as_tensor(t) for key, t in state["blocks"].items()}
    tensors[_PROMPT_KEYS] = _as_tensor(state["prompt_keys"])
    index = state.get("index")
    if index is not None:
        for name in _INDEX_ARRAYS:
            tensors[_INDEX_PREFIX + name] = _as_tensor(index[name])
    tensor_file = f"tensors-{generation}.safetensors"
    atomic_write(folder / tensor_file, lambda p: save_file(tensors, str(p)))
    rest = {k: v for k, v in state.items() if k not in ("blocks", "prompt_keys", "index")}
    rest["index_manifest"] = None if index is None else index["manifest"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "tensors": tensor_file,
        "state": rest,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    log.info("melo_state_saved", path=str(folder), generation=generation, tensors=len(tensors))
    return folder / MANIFEST


def load_state(directory: Path | str) -> dict[str, Any]:
    """Read what ``save_state`` wrote back into a state dict; EditorStateError if unusable."""
    folder = Path(directory)
    manifest = _read_manifest(folder / MANIFEST)
    try:
        tensors = load_file(str(folder / str(manifest["tensors"])))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise EditorStateError(f"{folder}: cannot read the melo tensor file: {exc}") from exc
    state: dict[str, Any] = dict(manifest["state"])
    index_manifest = state.pop("index_manifest", None)
    try:
        state["prompt_keys"] = tensors.pop(_PROMPT_KEYS)
        index_arrays = {
            name: tensors.pop(_INDEX_PREFIX + name).numpy()
            for name in _INDEX_ARRAYS
            if index_manifest is not None
        }
    except KeyError as exc:
        raise EditorStateError(f"{folder}: the melo tensor file lacks {exc}") from exc
    state["index"] = (
        None if index_manifest is None else {"manifest": index_manifest, **index_arrays}
    )
    state["blocks"] = tensors
    return state


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EditorStateError(f"{path}: cannot read the melo manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else None
        raise EditorStateError(
            f"{path}: unknown melo state format version {found!r} (expected {FORMAT_VERSION})"
        )
    if not isinstance(data.get("state"), dict) or not isinstance(data.get("tensors"), str):
        raise EditorStateError(f"{path}: the melo manifest lacks 'state' or 'tensors'")
    return data


# --- validating a state before it is loaded ------------------------------------------


@dataclass(frozen=True)
class ParsedState:
    """A state dict checked for consistency, ready to be put in place."""

    table: BlockTable
    index: NeuronIndex | None
    specs: tuple[EditSpec, ...]
    prompt_keys: tuple[npt.NDArray[np.float32], ...]
    weights: dict[int, dict[str, torch.Tensor]]


def parse_state(state: Mapping[str, Any], dim: int) -> ParsedState:
    """Rebuild the table, index and specs; EditorStateError when the parts disagree."""
    try:
        table = BlockTable.from_state(dict(state["table"]))
        index = None if state.get("index") is None else NeuronIndex.from_state(state["index"])
        specs = tuple(spec_from_dict(d) for d in state["edits"])
        matrix = np.asarray(torch.as_tensor(state["prompt_keys"]).numpy(), dtype=np.float32)
        raw_blocks = dict(state["blocks"])
    except (KeyError, TypeError, NeuronIndexError) as exc:
        raise EditorStateError(f"melo state is malformed: {exc}") from exc
    if matrix.shape != (len(specs), dim):
        raise EditorStateError(f"melo state: prompt keys {matrix.shape} for {len(specs)} edits")
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in raw_blocks.items():
        block, name = split_block_key(key)
        weights.setdefault(block, {})[name] = tensor
    live = set(table.snapshot()["blocks"])
    if set(weights) != live:
        raise EditorStateError(
            f"melo state: weights for blocks {sorted(weights)}, table holds {sorted(live)}"
        )
    if index is not None and index.edit_ids() != {s.edit_id for s in specs}:
        raise EditorStateError("melo state: the index and the applied edits disagree")
    return ParsedState(table, index, specs, tuple(matrix), weights)
