"""Reading and writing the neuron index's files: atomic writes, validated reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from daemon.editors.melo.faiss_ops import F32, ntotal
from daemon.errors import NeuronIndexError

STATE_VERSION = 1


def save_npy(path: Path, arr: F32) -> None:
    with path.open("wb") as f:
        np.save(f, arr, allow_pickle=False)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NeuronIndexError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise NeuronIndexError(f"{path}: unknown manifest version {version!r}")
    return data


def read_npy(path: Path, shape: tuple[int, int]) -> F32:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NeuronIndexError(f"{path}: cannot read array: {exc}") from exc
    if arr.shape != shape or arr.dtype != np.float32:
        raise NeuronIndexError(f"{path}: expected float32 {shape}, found {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def read_faiss(path: Path, count: int, dim: int) -> Any:
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise NeuronIndexError(f"{path}: cannot read faiss index: {exc}") from exc
    if ntotal(index) != count or int(index.d) != dim:
        raise NeuronIndexError(
            f"{path}: faiss index holds {ntotal(index)} vectors of dim {index.d}, "
            f"manifest lists {count} clusters of dim {dim}"
        )
    return index
