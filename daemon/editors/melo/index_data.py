"""The neuron index's data (keys, clusters, faiss over the centres) and its persisted form.

:class:`IndexData` is the base of :class:`~daemon.editors.melo.index.NeuronIndex`,
which routes by this data and changes it by its insertion rules. It holds:

* the keys: a float32 buffer whose first rows are the stored keys (``_keys``, the
  source of truth), one ``KeyMeta`` per row and the rows' exact bytes (to find an
  identical key in O(1));
* the clusters by id (``Cluster``: centre, radius, target, block, member edits);
* faiss over the cluster *centres* (ids = cluster ids): an exact
  ``IndexIDMap2(IndexFlatL2)`` while there are at most ``exact_max`` centres, an
  ``IndexIVFFlat`` (its own id list; trained on the centres) past that. The numpy
  copies of all keys and centres are the source of truth: the faiss index can
  always be rebuilt from them, and is after removals from an IVF index.

The persisted form carries a version (``index_files.STATE_VERSION``): ``save`` /
``load`` write and read a folder (keys, centres, the faiss index and a JSON
manifest, each file atomically); ``to_state`` / ``from_state`` hold the same in
memory, for the editor's state dict; ``copy`` makes an independent twin.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import faiss
import numpy as np
import numpy.typing as npt
import structlog

from daemon.editors.melo import faiss_ops, index_files
from daemon.editors.melo.faiss_ops import F32
from daemon.editors.melo.index_files import STATE_VERSION
from daemon.editors.melo.index_records import Cluster, KeyMeta
from daemon.errors import NeuronIndexError
from daemon.files import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
KEYS_FILE = "keys.npy"
CENTRES_FILE = "centres.npy"
FAISS_FILE = "centres.faiss"

log = structlog.get_logger()


class IndexData:
    """Keys, clusters and a faiss index over the cluster centres; save, load and copy."""

    def __init__(
        self,
        dim: int,
        *,
        radius: float,
        exact_max: int = 10_000,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        if dim < 1 or radius <= 0 or exact_max < 1 or nprobe < 1:
            raise ValueError(f"bad NeuronIndex settings: {dim=} {radius=} {exact_max=} {nprobe=}")
        self.dim = dim
        self.radius = float(radius)
        self.exact_max = exact_max
        self.nlist = nlist
        self.nprobe = nprobe
        self._buf: F32 = np.zeros((64, dim), dtype=np.float32)  # rows [0, _n) are the keys
        self._n = 0
        self._meta: list[KeyMeta] = []  # one per row of _keys
        self._by_bytes: dict[bytes, list[KeyMeta]] = {}  # exact key -> its entries
        self._clusters: dict[int, Cluster] = {}
        self._next_cluster = 0
        self._faiss: Any = faiss_ops.flat_index(dim)
        self._is_ivf = False
        self._lock = threading.RLock()

    @property
    def _keys(self) -> F32:
        """(N, d) float32: every stored key, the source of truth."""
        return self._buf[: self._n]

    @_keys.setter
    def _keys(self, keys: F32) -> None:
        self._buf = np.array(keys, dtype=np.float32).reshape(-1, self.dim)
        self._n = len(self._buf)
        self._by_bytes = {}
        for row, meta in zip(self._buf, self._meta, strict=False):
            self._by_bytes.setdefault(row.tobytes(), []).append(meta)

    def _append_key(self, vec: F32, meta: KeyMeta) -> int:
        if self._n == len(self._buf):  # double the buffer: amortised O(d) per key
            grown = np.zeros((max(64, 2 * len(self._buf)), self.dim), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n] = vec
        self._n += 1
        self._meta.append(meta)
        self._by_bytes.setdefault(vec.tobytes(), []).append(meta)
        return self._n - 1

    # --- contents ------------------------------------------------------------------

    @property
    def key_count(self) -> int:
        return len(self._meta)

    @property
    def cluster_count(self) -> int:
        return len(self._clusters)

    @property
    def is_approximate(self) -> bool:
        """True once the search runs on an IVF index (more than ``exact_max`` centres)."""
        return self._is_ivf

    def clusters(self) -> dict[int, Cluster]:
        """The clusters by id (copies of the list fields; centres are shared arrays)."""
        return {
            c.cluster_id: Cluster(
                c.cluster_id, c.centre, c.radius, c.target, c.block, list(c.edit_ids)
            )
            for c in self._clusters.values()
        }

    def edit_ids(self) -> set[str]:
        return {m.edit_id for m in self._meta}

    # --- backend -------------------------------------------------------------------

    def _centres(self) -> tuple[F32, npt.NDArray[np.int64]]:
        ids = np.array(sorted(self._clusters), dtype=np.int64)
        vecs = np.stack([self._clusters[int(i)].centre for i in ids]) if len(ids) else None
        return (np.zeros((0, self.dim), np.float32) if vecs is None else vecs), ids

    def _maybe_switch_backend(self) -> None:
        if (len(self._clusters) > self.exact_max) != self._is_ivf:
            self._rebuild()

    def _rebuild(self) -> None:
        vecs, ids = self._centres()
        self._is_ivf = len(ids) > self.exact_max
        if self._is_ivf:
            nlist = self.nlist or max(1, int(np.sqrt(len(ids))))
            self._faiss = faiss_ops.ivf_index(vecs, min(nlist, len(ids)), self.nprobe)
        else:
            self._faiss = faiss_ops.flat_index(self.dim)
        if len(ids):
            faiss_ops.add(self._faiss, vecs, ids)
        log.info("neuron_index_rebuilt", approximate=self._is_ivf, centres=len(ids))

    # --- persistence ---------------------------------------------------------------

    def save(self, directory: Path | str) -> None:
        """Write keys, centres, the faiss index and a versioned manifest (each atomically)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        vecs, _ = self._centres()
        atomic_write(folder / KEYS_FILE, lambda p: index_files.save_npy(p, self._keys))
        atomic_write(folder / CENTRES_FILE, lambda p: index_files.save_npy(p, vecs))
        atomic_write(folder / FAISS_FILE, lambda p: faiss.write_index(self._faiss, str(p)))
        text = json.dumps(self._manifest(), indent=1)
        atomic_write_text(folder / MANIFEST, text)
        log.info("neuron_index_saved", path=str(folder), keys=self.key_count)

    def _manifest(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "settings": {
                "dim": self.dim,
                "radius": self.radius,
                "exact_max": self.exact_max,
                "nlist": self.nlist,
                "nprobe": self.nprobe,
            },
            "next_cluster": self._next_cluster,
            "approximate": self._is_ivf,
            "clusters": [  # edit_ids copied: a state must not change with the index
                {
                    "cluster_id": c.cluster_id,
                    "radius": c.radius,
                    "target": c.target,
                    "block": c.block,
                    "edit_ids": list(c.edit_ids),
                }
                for c in (self._clusters[i] for i in sorted(self._clusters))
            ],
            "keys": [[m.edit_id, m.target, m.block, m.cluster_id] for m in self._meta],
        }

    def copy(self) -> Self:
        """An independent copy (keys, clusters, faiss index): ``retract`` changes one, O(N)."""
        twin = type(self)(
            self.dim,
            radius=self.radius,
            exact_max=self.exact_max,
            nlist=self.nlist,
            nprobe=self.nprobe,
        )
        twin._meta = [KeyMeta(m.edit_id, m.target, m.block, m.cluster_id) for m in self._meta]
        twin._keys = self._keys  # the setter copies and re-indexes the exact keys
        twin._clusters = {  # centres are never written after _open: share them
            cid: Cluster(cid, c.centre, c.radius, c.target, c.block, list(c.edit_ids))
            for cid, c in self._clusters.items()
        }
        twin._next_cluster = self._next_cluster
        twin._faiss = faiss_ops.clone(self._faiss)
        twin._is_ivf = self._is_ivf
        if twin._is_ivf:
            faiss_ops.set_nprobe(twin._faiss, twin.nprobe)
        return twin

    def to_state(self) -> dict[str, Any]:
        """The index in memory: the JSON-able manifest plus numpy arrays.

        ``{"manifest": dict, "keys": (N, d) float32, "centres": (C, d) float32,
        "faiss": uint8 bytes}``; what ``save`` writes as files, for a state dict.
        """
        vecs, _ = self._centres()
        return {
            "manifest": self._manifest(),
            "keys": self._keys.copy(),
            "centres": vecs.copy(),
            "faiss": faiss_ops.serialize(self._faiss),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Self:
        """Rebuild an index from ``to_state``; raise NeuronIndexError when it does not fit."""
        manifest = state.get("manifest")
        if not isinstance(manifest, dict) or manifest.get("version") != STATE_VERSION:
            version = manifest.get("version") if isinstance(manifest, dict) else None
            raise NeuronIndexError(f"neuron index state has unknown version {version!r}")
        index, clusters = cls._from_manifest(manifest, "neuron index state")
        try:
            keys = np.asarray(state["keys"], dtype=np.float32)
            centres = np.asarray(state["centres"], dtype=np.float32)
            raw_faiss = np.asarray(state["faiss"], dtype=np.uint8)
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronIndexError(f"neuron index state is malformed: {exc}") from exc
        if keys.shape != (len(index._meta), index.dim) or centres.shape != (
            len(clusters),
            index.dim,
        ):
            raise NeuronIndexError(
                f"neuron index state: keys {keys.shape} / centres {centres.shape} do not fit "
                f"{len(index._meta)} keys and {len(clusters)} clusters of dim {index.dim}"
            )
        index._keys = keys
        index._load_clusters(Path("<state>"), clusters, centres)
        searcher = faiss_ops.deserialize(raw_faiss)
        if faiss_ops.ntotal(searcher) != len(clusters):
            raise NeuronIndexError("neuron index state: faiss index and clusters disagree")
        index._set_faiss(searcher, approximate=bool(manifest.get("approximate", False)))
        return index

    @classmethod
    def load(cls, directory: Path | str) -> Self:
        """Read a saved index; raise NeuronIndexError naming the file that does not fit."""
        folder = Path(directory)
        manifest = index_files.read_manifest(folder / MANIFEST)
        index, clusters = cls._from_manifest(manifest, f"{folder / MANIFEST}")
        index._keys = index_files.read_npy(folder / KEYS_FILE, (len(index._meta), index.dim))
        centres = index_files.read_npy(folder / CENTRES_FILE, (len(clusters), index.dim))
        index._load_clusters(folder / MANIFEST, clusters, centres)
        searcher = index_files.read_faiss(folder / FAISS_FILE, len(clusters), index.dim)
        index._set_faiss(searcher, approximate=bool(manifest.get("approximate", False)))
        log.info("neuron_index_loaded", path=str(folder), keys=index.key_count)
        return index

    @classmethod
    def _from_manifest(
        cls, manifest: Mapping[str, Any], where: str
    ) -> tuple[Self, list[dict[str, Any]]]:
        """An empty index with the manifest's settings and key table; its cluster specs."""
        try:
            index = cls(**manifest["settings"])
            index._next_cluster = int(manifest["next_cluster"])
            index._meta = [
                KeyMeta(str(e), str(t), int(b), int(c)) for e, t, b, c in manifest["keys"]
            ]
            clusters = list(manifest["clusters"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronIndexError(f"{where}: malformed manifest: {exc}") from exc
        return index, clusters

    def _set_faiss(self, searcher: Any, *, approximate: bool) -> None:
        self._faiss = searcher
        self._is_ivf = approximate
        if approximate:
            faiss_ops.set_nprobe(self._faiss, self.nprobe)

    def _load_clusters(self, path: Path, clusters: list[dict[str, Any]], centres: F32) -> None:
        try:
            for spec, centre in zip(clusters, centres, strict=True):
                c = Cluster(centre=centre.copy(), **spec)
                self._clusters[c.cluster_id] = c
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronIndexError(f"{path}: malformed cluster entry: {exc}") from exc
        if len(self._clusters) != len(clusters):
            raise NeuronIndexError(f"{path}: duplicate cluster ids")
        for m in self._meta:
            if m.cluster_id not in self._clusters:
                raise NeuronIndexError(f"{path}: key of '{m.edit_id}' in unknown cluster")
        member_count = sum(len(c.edit_ids) for c in self._clusters.values())
        if member_count != len(self._meta):
            raise NeuronIndexError(
                f"{path}: clusters list {member_count} keys, key table has {len(self._meta)}"
            )
