"""MELO's neuron-key index: which LoRA block (if any) a prompt's key routes to.

A key is a float32 hidden state (dim ``d``) of an edit prompt. Keys are grouped in
clusters; a cluster has a centre (the key that opened it), a radius, a target text
and a block id. Distances are plain Euclidean (L2, *not* squared) everywhere in
this module: radii, ``Route.distance`` and ``calibration.calibrate_radius`` share that
unit; faiss's squared distances are square-rooted at the boundary (``_faiss_search``).

Insertion rules (``add``), against the nearest cluster centre at distance ``dist``:

* ``dist > radius`` of that cluster: the key opens a new cluster (centre = key,
  radius = the index's default radius, or the key's own smaller one: ``add(...,
  radius=r)``, kept with the key in ``KeyMeta.radius`` for every later re-insertion).
* within the radius and the same target (exact string compare): the key joins;
  the centre and radius stay.
* within the radius and a different target: split. The key opens its own
  cluster of radius ``r = min(its radius, dist / 2)`` and the old cluster's radius
  shrinks to ``min(radius, dist - r)``, so the two balls no longer overlap (with the
  default radius both become ``dist / 2``, MELO's rule; a key with a small radius of
  its own takes only that much from its neighbour). Keys of the old cluster that now
  lie outside its radius are taken out and re-inserted by the same rules; each is
  reported in ``AddResult.displaced`` with where it went, never dropped. A key at
  distance 0 from a centre with a different target cannot be separated and raises
  :class:`EditConflictError`.

Routing (``query``) takes the nearest centre and routes to its block when the
query lies within that cluster's radius, else None (the base model runs).

The data :class:`NeuronIndex` holds:

* the keys: a float32 buffer whose first rows are the stored keys (``_keys``, the
  source of truth), one ``KeyMeta`` per row and the rows' exact bytes (to find an
  identical key in O(1));
* the clusters by id (``Cluster``: centre, radius, target, block, member edits);
* faiss over the cluster *centres* (ids = cluster ids): an exact
  ``IndexIDMap2(IndexFlatL2)`` while there are at most ``exact_max`` centres, an
  ``IndexIVFFlat`` (its own id list; trained on the centres) past that. The numpy
  copies of all keys and centres are the source of truth: the faiss index can
  always be rebuilt from them, and is after removals from an IVF index. faiss is
  called through the typed ``_faiss_*`` wrappers (faiss ships no type stubs).

The persisted form carries a version (``STATE_VERSION``): ``save`` / ``load`` write
and read a folder (keys, centres, the faiss index and a JSON manifest, each file
atomically; reads are validated); ``to_state`` / ``from_state`` hold the same in
memory, for the editor's state dict; ``copy`` makes an independent twin.

Transactions (``begin`` / ``commit`` / ``rollback``): inserts made after ``begin``
are journalled (:class:`Journal`) and ``rollback`` restores the index exactly as
it was at ``begin`` (``to_state()`` byte for byte), in time proportional to what
changed, not to the index size. ``query``, ``add_batch`` and ``rollback`` hold the
index's lock, so a reader in another thread sees the index before or after a
batch of keys, never half-way through one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import faiss
import numpy as np
import numpy.typing as npt
import structlog

from daemon.errors import EditConflictError, NeuronIndexError
from daemon.files import atomic_write, atomic_write_text

F32 = npt.NDArray[np.float32]
STATE_VERSION = 1
MANIFEST = "manifest.json"
KEYS_FILE = "keys.npy"
CENTRES_FILE = "centres.npy"
FAISS_FILE = "centres.faiss"
SMALL_QUERY = 16  # query rows up to which faiss searches on one thread

log = structlog.get_logger()


# --- records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where one query goes: the block to activate, its cluster, the L2 distance."""

    block: int
    cluster_id: int
    distance: float


@dataclass(frozen=True)
class Displaced:
    """A key moved out of a shrunken cluster, and the cluster it was re-inserted into."""

    edit_id: str
    from_cluster: int
    to_cluster: int


@dataclass(frozen=True)
class AddResult:
    """What ``add`` did with one key. ``block`` is the block the key now routes to."""

    edit_id: str
    cluster_id: int
    block: int
    action: Literal["opened", "joined", "split"]
    displaced: tuple[Displaced, ...] = ()


@dataclass
class Cluster:
    """A ball around ``centre`` routed to ``block``; ``edit_ids`` has one entry per key."""

    cluster_id: int
    centre: F32
    radius: float
    target: str
    block: int
    edit_ids: list[str] = field(default_factory=list)


@dataclass
class KeyMeta:
    """One stored key: its edit, target, block and cluster; ``radius``: the largest
    radius a cluster it opens may have (None: the index's radius)."""

    edit_id: str
    target: str
    block: int
    cluster_id: int
    radius: float | None = None


# --- the undo journal ------------------------------------------------------------------


@dataclass
class Journal:
    """The index's state at ``begin`` wherever an open insert transaction changed it.

    ``NeuronIndex.begin()`` opens a :class:`Journal`; every change ``add`` makes while
    it is open is recorded the first time it touches something, with the value it
    had at ``begin``:

    * keys appended: rows ``key_count ..`` (their metas and exact-key entries) go;
    * clusters opened: ids ``next_cluster ..`` go, from the dict and from faiss;
    * clusters changed (a key joined, a split shrank the radius, keys were evicted):
      their radius and member list at ``begin`` (``clusters``);
    * keys moved (evicted by a split, re-inserted elsewhere): their cluster id at
      ``begin`` (``key_clusters``);
    * the faiss index object and whether it is IVF (a switch to IVF replaces it).

    Centres are never written after a cluster opens, and blocks change only in
    ``reassign_blocks`` (not allowed while a journal is open), so nothing else can
    differ. Recording costs O(1) per change plus a copy of each touched cluster's
    member list, independent of the index size: the rollback replaces the full copy
    of the index a transaction used to take.
    """

    key_count: int
    next_cluster: int
    searcher: Any  # the faiss index at begin (opaque: faiss ships no stubs)
    approximate: bool
    clusters: dict[int, tuple[float, list[str]]] = field(default_factory=dict)
    key_clusters: dict[int, int] = field(default_factory=dict)

    def touch_cluster(self, cluster: Cluster) -> None:
        """Remember ``cluster``'s radius and members before their first change."""
        cid = cluster.cluster_id
        if cid < self.next_cluster and cid not in self.clusters:
            self.clusters[cid] = (cluster.radius, list(cluster.edit_ids))

    def touch_key(self, row: int, meta: KeyMeta) -> None:
        """Remember the cluster of key ``row`` before its first change."""
        if row < self.key_count and row not in self.key_clusters:
            self.key_clusters[row] = meta.cluster_id

    def opened(self, next_cluster: int) -> list[int]:
        """The ids of the clusters opened since ``begin`` (given the index's next id now)."""
        return list(range(self.next_cluster, next_cluster))


# --- faiss (typed wrappers) and distances -----------------------------------------------


def _own_radius(radius: float | None, default: float) -> float | None:
    """A key's own radius: None (the index's) unless given and below ``default``."""
    if radius is None:
        return None
    if not radius > 0:
        raise ValueError(f"a key's radius must be > 0, got {radius}")
    return float(radius) if radius < default else None


def _key_meta(entry: Sequence[Any]) -> KeyMeta:
    """A manifest's key entry: ``[edit_id, target, block, cluster_id]`` and, for a key
    with its own radius, that radius."""
    if len(entry) not in (4, 5):
        raise ValueError(f"a key entry has 4 or 5 fields, not {len(entry)}")
    edit_id, target, block, cluster_id = entry[:4]
    radius = float(entry[4]) if len(entry) == 5 else None
    return KeyMeta(str(edit_id), str(target), int(block), int(cluster_id), radius)


def _faiss_flat_index(dim: int) -> Any:
    return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))


def _faiss_ivf_index(vectors: F32, nlist: int, nprobe: int) -> Any:
    quantizer = faiss.IndexFlatL2(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_L2)
    index.train(vectors)  # faiss's Python wrapper keeps ``quantizer`` alive with ``index``
    index.nprobe = nprobe
    return index


def _faiss_set_nprobe(index: Any, nprobe: int) -> None:
    index.nprobe = nprobe


def _faiss_add(index: Any, vectors: F32, ids: npt.NDArray[np.int64]) -> None:
    index.add_with_ids(vectors, ids)


def _faiss_search(index: Any, queries: F32, k: int) -> tuple[F32, npt.NDArray[np.int64]]:
    """k nearest (L2, square-rooted) of each query row.

    A few queries run on one OpenMP thread: for them, waking the thread pool costs
    more than the search itself. ``omp_set_num_threads`` sets the calling thread's
    value only, and it is restored afterwards.
    """
    if len(queries) > SMALL_QUERY:
        sq, ids = index.search(queries, k)
    else:
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            sq, ids = index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)
    return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32), ids.astype(np.int64)


def _faiss_remove(index: Any, ids: Sequence[int]) -> None:
    index.remove_ids(np.asarray(ids, dtype=np.int64))


def _faiss_ntotal(index: Any) -> int:
    return int(index.ntotal)


def _faiss_clone(index: Any) -> Any:
    """An independent deep copy (same vectors, ids and training; set nprobe again)."""
    return faiss.clone_index(index)


def _faiss_serialize(index: Any) -> npt.NDArray[np.uint8]:
    """The index as bytes in a uint8 array (faiss's own format), for state dicts."""
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def _faiss_deserialize(data: npt.NDArray[np.uint8]) -> Any:
    return faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))


def pairwise_sq(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> Any:
    """(len(a), len(b)) squared L2 distances in float64, clipped at 0."""
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


# --- files -----------------------------------------------------------------------------


def _save_npy(path: Path, arr: F32) -> None:
    with path.open("wb") as f:
        np.save(f, arr, allow_pickle=False)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NeuronIndexError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise NeuronIndexError(f"{path}: unknown manifest version {version!r}")
    return data


def _read_npy(path: Path, shape: tuple[int, int]) -> F32:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NeuronIndexError(f"{path}: cannot read array: {exc}") from exc
    if arr.shape != shape or arr.dtype != np.float32:
        raise NeuronIndexError(f"{path}: expected float32 {shape}, found {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _read_faiss(path: Path, count: int, dim: int) -> Any:
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise NeuronIndexError(f"{path}: cannot read faiss index: {exc}") from exc
    if _faiss_ntotal(index) != count or int(index.d) != dim:
        raise NeuronIndexError(
            f"{path}: faiss index holds {_faiss_ntotal(index)} vectors of dim {index.d}, "
            f"manifest lists {count} clusters of dim {dim}"
        )
    return index


# --- the index -------------------------------------------------------------------------


class NeuronIndex:
    """Keys in clusters, searched by faiss over the centres; the rules that change them;
    save, load and copy."""

    _journal: Journal | None = None  # open between begin() and commit()/rollback()

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
        self._faiss: Any = _faiss_flat_index(dim)
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
            self._faiss = _faiss_ivf_index(vecs, min(nlist, len(ids)), self.nprobe)
        else:
            self._faiss = _faiss_flat_index(self.dim)
        if len(ids):
            _faiss_add(self._faiss, vecs, ids)
        log.info("neuron_index_rebuilt", approximate=self._is_ivf, centres=len(ids))

    # --- queries -------------------------------------------------------------------

    def query(self, keys: npt.ArrayLike) -> list[Route | None]:
        """Per query row of ``keys`` (B, d): the nearest centre's block if within radius."""
        q = self._as_keys(keys)
        with self._lock:
            if not self._clusters:
                return [None] * len(q)
            dist, ids = _faiss_search(self._faiss, q, 1)
            routes: list[Route | None] = []
            for d, cid in zip(dist[:, 0], ids[:, 0], strict=True):
                cluster = self._clusters.get(int(cid))
                if cluster is None or float(d) > cluster.radius:
                    routes.append(None)
                else:
                    routes.append(Route(cluster.block, cluster.cluster_id, float(d)))
            return routes

    def _as_keys(self, keys: npt.ArrayLike) -> F32:
        arr = np.asarray(keys, dtype=np.float32)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("keys contain NaN or inf")
        return np.ascontiguousarray(arr)

    # --- transactions --------------------------------------------------------------

    def begin(self) -> None:
        """Start journalling inserts so that ``rollback`` can undo them (no nesting)."""
        with self._lock:
            if self._journal is not None:
                raise NeuronIndexError("an insert transaction is already open")
            self._journal = Journal(self._n, self._next_cluster, self._faiss, self._is_ivf)

    def commit(self) -> None:
        """Keep what was inserted since ``begin``; stop journalling."""
        with self._lock:
            self._end()

    def rollback(self) -> None:
        """Undo every insert since ``begin``: the index is exactly as it was then."""
        with self._lock:
            j = self._end()
            dropped = self._n - j.key_count
            for row in range(self._n - 1, j.key_count - 1, -1):  # appended keys, newest first
                exact = self._buf[row].tobytes()
                same = self._by_bytes[exact]
                if same.pop() is not self._meta[row]:  # pragma: no cover - appended in row order
                    raise NeuronIndexError("neuron index journal out of order")
                if not same:
                    del self._by_bytes[exact]
            del self._meta[j.key_count :]
            self._n = j.key_count
            for row, cid in j.key_clusters.items():
                self._meta[row].cluster_id = cid
            for cid, (radius, members) in j.clusters.items():
                self._clusters[cid].radius = radius
                self._clusters[cid].edit_ids = members
            opened = j.opened(self._next_cluster)
            for cid in opened:
                del self._clusters[cid]
            self._next_cluster = j.next_cluster
            self._faiss, self._is_ivf = j.searcher, j.approximate
            if opened:  # ids a rebuilt (IVF) index took are simply not in the old one
                _faiss_remove(self._faiss, opened)
            log.debug("neuron_keys_rolled_back", keys=dropped, clusters=len(opened))

    def _end(self) -> Journal:
        if self._journal is None:
            raise NeuronIndexError("no insert transaction is open")
        journal, self._journal = self._journal, None
        return journal

    def _no_journal(self, what: str) -> None:
        if self._journal is not None:
            raise NeuronIndexError(f"{what} is not allowed during an insert transaction")

    def _touch_key(self, row: int) -> None:
        if self._journal is not None:
            self._journal.touch_key(row, self._meta[row])

    def _touch_cluster(self, cluster: Cluster) -> None:
        if self._journal is not None:
            self._journal.touch_cluster(cluster)

    # --- insertion -----------------------------------------------------------------

    def add(
        self,
        edit_id: str,
        key: npt.ArrayLike,
        target: str,
        block: int,
        *,
        radius: float | None = None,
    ) -> AddResult:
        """Insert one key by the rules in the module docstring; ``radius``: the key's own
        largest radius (below the index's: a key that must route only what lies closer)."""
        vec = self._as_keys(key)
        if len(vec) != 1:
            raise ValueError(f"add takes one key, got {len(vec)}")
        own = _own_radius(radius, self.radius)
        with self._lock:
            self._check_same_key(edit_id, vec[0], target)
            row = self._append_key(vec[0], KeyMeta(edit_id, target, block, -1, own))
            action, cluster_id, displaced = self._place(row)
            self._maybe_switch_backend()
        log.debug("neuron_key_added", edit_id=edit_id, cluster_id=cluster_id, action=action)
        return AddResult(
            edit_id, cluster_id, self._clusters[cluster_id].block, action, tuple(displaced)
        )

    def add_batch(
        self,
        edit_ids: Sequence[str],
        keys: npt.ArrayLike,
        targets: Sequence[str],
        block: int,
        *,
        radius: float | None = None,
    ) -> list[AddResult]:
        """Insert a batch (every key with the same own ``radius``, see ``add``); first reject
        keys within the radius of each other with other targets."""
        vecs = self._as_keys(keys)
        if not len(edit_ids) == len(vecs) == len(targets):
            raise ValueError(f"{len(edit_ids)} ids, {len(vecs)} keys, {len(targets)} targets")
        self._check_batch_conflicts(edit_ids, vecs, targets)
        with self._lock:
            for e, v, t in zip(edit_ids, vecs, targets, strict=True):
                self._check_same_key(e, v, t)
            return [
                self.add(e, v[None, :], t, block, radius=radius)
                for e, v, t in zip(edit_ids, vecs, targets, strict=True)
            ]

    def _check_same_key(self, edit_id: str, vec: F32, target: str) -> None:
        """An identical stored key with another target cannot be split apart: reject."""
        same = self._by_bytes.get(np.ascontiguousarray(vec, dtype=np.float32).tobytes(), [])
        clash = sorted({m.edit_id for m in same if m.target != target})
        if clash:
            raise EditConflictError(
                f"edit '{edit_id}' has the same key as edits {clash} but a different target",
                edit_ids=[edit_id, *clash],
            )

    def _check_batch_conflicts(
        self, edit_ids: Sequence[str], vecs: F32, targets: Sequence[str]
    ) -> None:
        x = vecs.astype(np.float64)
        pairs: list[tuple[str, str]] = []
        for start in range(0, len(x), 1024):  # (chunk, B) distance rows at a time
            near = pairwise_sq(x[start : start + 1024], x) <= self.radius**2
            for i, j in zip(*np.nonzero(near), strict=True):
                a, b = start + int(i), int(j)
                if a < b and targets[a] != targets[b]:
                    pairs.append((edit_ids[a], edit_ids[b]))
        if pairs:
            raise EditConflictError(
                f"edits in one batch have keys within radius {self.radius:g} but different "
                f"targets: {pairs}",
                edit_ids=sorted({e for p in pairs for e in p}),
            )

    def _place(self, row: int) -> tuple[Literal["opened", "joined", "split"], int, list[Displaced]]:
        """Put key ``row`` in a cluster; re-insert any keys a split displaces."""
        action, cluster_id, pending = self._place_one(row)
        displaced: list[Displaced] = []
        for _ in range(10 * max(1, len(self._meta))):
            if not pending:
                return action, cluster_id, displaced
            moved_row, from_cluster = pending.pop(0)
            _, to_cluster, more = self._place_one(moved_row)
            displaced.append(Displaced(self._meta[moved_row].edit_id, from_cluster, to_cluster))
            pending.extend(more)
        raise NeuronIndexError("re-inserting displaced keys did not settle")  # pragma: no cover

    def _place_one(
        self, row: int
    ) -> tuple[Literal["opened", "joined", "split"], int, list[tuple[int, int]]]:
        meta, vec = self._meta[row], self._keys[row]
        own = self.radius if meta.radius is None else meta.radius
        nearest = self._nearest(vec)
        if nearest is None or nearest[1] > nearest[0].radius:
            return "opened", self._open(row, own), []
        cluster, dist = nearest
        if cluster.target == meta.target:
            self._touch_key(row)
            self._touch_cluster(cluster)
            meta.cluster_id = cluster.cluster_id
            cluster.edit_ids.append(meta.edit_id)
            return "joined", cluster.cluster_id, []
        if dist == 0.0:  # pragma: no cover - _check_same_key rejects this before any change
            raise EditConflictError(
                f"edit '{meta.edit_id}' has the same key as cluster {cluster.cluster_id} "
                f"(edits {cluster.edit_ids}) but a different target",
                edit_ids=[meta.edit_id, *cluster.edit_ids],
            )
        self._touch_cluster(cluster)
        mine = min(own, dist / 2.0)
        cluster.radius = min(cluster.radius, dist - mine)
        new_id = self._open(row, mine)
        log.info("neuron_clusters_split", cluster_id=cluster.cluster_id, new_cluster_id=new_id)
        return "split", new_id, [(r, cluster.cluster_id) for r in self._evict(cluster)]

    def _nearest(self, vec: F32) -> tuple[Cluster, float] | None:
        if not self._clusters:
            return None
        _, ids = _faiss_search(self._faiss, vec[None, :], 1)
        cluster = self._clusters.get(int(ids[0, 0]))
        if cluster is None:
            return None
        # exact distance in float64: faiss's may be off by rounding, and 0 must mean equal
        return cluster, float(np.linalg.norm(vec.astype(np.float64) - cluster.centre))

    def _open(self, row: int, radius: float) -> int:
        meta = self._meta[row]
        cid = self._next_cluster
        self._next_cluster += 1
        centre = self._keys[row].copy()
        self._clusters[cid] = Cluster(cid, centre, radius, meta.target, meta.block, [meta.edit_id])
        self._touch_key(row)
        meta.cluster_id = cid
        # IVF: new centres are added without retraining
        _faiss_add(self._faiss, centre[None, :], np.array([cid], dtype=np.int64))
        return cid

    def _evict(self, cluster: Cluster) -> list[int]:
        """Take keys outside ``cluster``'s (shrunken) radius out of it; return their rows."""
        rows = [i for i, m in enumerate(self._meta) if m.cluster_id == cluster.cluster_id]
        dist = np.linalg.norm(self._keys[rows] - cluster.centre, axis=1)
        out = [r for r, d in zip(rows, dist.tolist(), strict=True) if d > cluster.radius]
        self._touch_cluster(cluster)
        for r in out:
            self._touch_key(r)
            cluster.edit_ids.remove(self._meta[r].edit_id)
            self._meta[r].cluster_id = -1
        return out

    # --- removal -------------------------------------------------------------------

    def remove(self, edit_ids: Sequence[str]) -> list[int]:
        """Remove every key of ``edit_ids``; return the ids of clusters left empty (dropped)."""
        self._no_journal("remove")
        gone = set(edit_ids)
        keep = np.array([m.edit_id not in gone for m in self._meta], dtype=bool)
        for m in self._meta:
            if m.edit_id in gone:
                self._clusters[m.cluster_id].edit_ids.remove(m.edit_id)
        self._meta = [m for m, k in zip(self._meta, keep, strict=True) if k]
        self._keys = self._keys[keep]  # after _meta: the setter re-indexes the exact keys
        empty = sorted(cid for cid, c in self._clusters.items() if not c.edit_ids)
        for cid in empty:
            del self._clusters[cid]
        if empty and self._is_ivf:
            self._rebuild()
        elif empty:
            _faiss_remove(self._faiss, empty)
        self._maybe_switch_backend()
        log.info("neuron_keys_removed", edit_ids=sorted(gone), dropped_clusters=empty)
        return empty

    def reassign_blocks(self, freed: Iterable[int]) -> list[tuple[int, int, int]]:
        """Point clusters whose block was freed at a block of a remaining member key.

        A key that *joined* another edit's cluster routes to that cluster's block,
        not to its own. When that block is freed (its edits retracted) while the
        cluster still holds keys of live edits, the cluster would route them to a
        cleared block; instead it takes over the block its first remaining member
        was inserted with (that member's edit is live, so its block is too).
        Returns ``(cluster_id, old_block, new_block)`` per reassigned cluster.
        """
        self._no_journal("reassign_blocks")
        gone = set(freed)
        moves: list[tuple[int, int, int]] = []
        for cluster in self._clusters.values():
            if cluster.block not in gone:
                continue
            owners = [
                m.block
                for m in self._meta
                if m.cluster_id == cluster.cluster_id and m.block not in gone
            ]
            if not owners:
                raise NeuronIndexError(
                    f"cluster {cluster.cluster_id} routes to freed block {cluster.block} "
                    f"and no member key has a live block (edits {cluster.edit_ids})"
                )
            moves.append((cluster.cluster_id, cluster.block, owners[0]))
            cluster.block = owners[0]
        for cid, old, new in moves:
            log.info("neuron_cluster_reassigned", cluster_id=cid, old_block=old, new_block=new)
        return moves

    # --- persistence ---------------------------------------------------------------

    def save(self, directory: Path | str) -> None:
        """Write keys, centres, the faiss index and a versioned manifest (each atomically)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        vecs, _ = self._centres()
        atomic_write(folder / KEYS_FILE, lambda p: _save_npy(p, self._keys))
        atomic_write(folder / CENTRES_FILE, lambda p: _save_npy(p, vecs))
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
            "keys": [  # a key's own radius only when it has one (older manifests lack it)
                [m.edit_id, m.target, m.block, m.cluster_id]
                + ([] if m.radius is None else [m.radius])
                for m in self._meta
            ],
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
        twin._meta = [
            KeyMeta(m.edit_id, m.target, m.block, m.cluster_id, m.radius) for m in self._meta
        ]
        twin._keys = self._keys  # the setter copies and re-indexes the exact keys
        twin._clusters = {  # centres are never written after _open: share them
            cid: Cluster(cid, c.centre, c.radius, c.target, c.block, list(c.edit_ids))
            for cid, c in self._clusters.items()
        }
        twin._next_cluster = self._next_cluster
        twin._faiss = _faiss_clone(self._faiss)
        twin._is_ivf = self._is_ivf
        if twin._is_ivf:
            _faiss_set_nprobe(twin._faiss, twin.nprobe)
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
            "faiss": _faiss_serialize(self._faiss),
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
        searcher = _faiss_deserialize(raw_faiss)
        if _faiss_ntotal(searcher) != len(clusters):
            raise NeuronIndexError("neuron index state: faiss index and clusters disagree")
        index._set_faiss(searcher, approximate=bool(manifest.get("approximate", False)))
        return index

    @classmethod
    def load(cls, directory: Path | str) -> Self:
        """Read a saved index; raise NeuronIndexError naming the file that does not fit."""
        folder = Path(directory)
        manifest = _read_manifest(folder / MANIFEST)
        index, clusters = cls._from_manifest(manifest, f"{folder / MANIFEST}")
        index._keys = _read_npy(folder / KEYS_FILE, (len(index._meta), index.dim))
        centres = _read_npy(folder / CENTRES_FILE, (len(clusters), index.dim))
        index._load_clusters(folder / MANIFEST, clusters, centres)
        searcher = _read_faiss(folder / FAISS_FILE, len(clusters), index.dim)
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
            index._meta = [_key_meta(entry) for entry in manifest["keys"]]
            clusters = list(manifest["clusters"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronIndexError(f"{where}: malformed manifest: {exc}") from exc
        return index, clusters

    def _set_faiss(self, searcher: Any, *, approximate: bool) -> None:
        self._faiss = searcher
        self._is_ivf = approximate
        if approximate:
            _faiss_set_nprobe(self._faiss, self.nprobe)

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
