"""MELO's neuron-key index: which LoRA block (if any) a prompt's key routes to.

A key is a float32 hidden state (dim ``d``) of an edit prompt. Keys are grouped in
clusters; a cluster has a centre (the key that opened it), a radius, a target text
and a block id. Distances are plain Euclidean (L2, *not* squared) everywhere in
this module: radii, ``Route.distance`` and ``distances.calibrate_radius`` share that unit;
faiss's squared distances are square-rooted at the boundary.

Insertion rules (``add``), against the nearest cluster centre at distance ``dist``:

* ``dist > radius`` of that cluster: the key opens a new cluster (centre = key,
  radius = the index's default radius).
* within the radius and the same target (exact string compare): the key joins;
  the centre and radius stay.
* within the radius and a different target: split. Both radii shrink to
  ``dist / 2`` (so the two balls no longer overlap) and the key opens its own
  cluster. Keys of the old cluster that now lie outside its radius are taken out
  and re-inserted by the same rules; each is reported in ``AddResult.displaced``
  with where it went, never dropped. A key at distance 0 from a centre with a
  different target cannot be separated and raises :class:`EditConflictError`.

Routing (``query``) takes the nearest centre and routes to its block when the
query lies within that cluster's radius, else None (the base model runs).

The keys, the clusters and faiss over the cluster centres (exact, or IVF past
``exact_max`` centres) are held by the base class ``index_data.IndexData``, with
the index's persisted form (``save`` / ``load``, ``to_state`` / ``from_state``,
``copy``).

Transactions (``begin`` / ``commit`` / ``rollback``): inserts made after ``begin``
are journalled (``index_journal``) and ``rollback`` restores the index exactly as
it was at ``begin`` (``to_state()`` byte for byte), in time proportional to what
changed, not to the index size. ``query``, ``add_batch`` and ``rollback`` hold the
index's lock, so a reader in another thread sees the index before or after a
batch of keys, never half-way through one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog

from daemon.editors.melo import faiss_ops
from daemon.editors.melo.distances import pairwise_sq
from daemon.editors.melo.faiss_ops import F32
from daemon.editors.melo.index_data import IndexData
from daemon.editors.melo.index_journal import Journal
from daemon.editors.melo.index_records import AddResult, Cluster, Displaced, KeyMeta, Route
from daemon.errors import EditConflictError, NeuronIndexError

log = structlog.get_logger()


class NeuronIndex(IndexData):
    """Keys in clusters, searched by faiss (``IndexData``), and the rules that change them."""

    _journal: Journal | None = None  # open between begin() and commit()/rollback()

    # --- queries -------------------------------------------------------------------

    def query(self, keys: npt.ArrayLike) -> list[Route | None]:
        """Per query row of ``keys`` (B, d): the nearest centre's block if within radius."""
        q = self._as_keys(keys)
        with self._lock:
            if not self._clusters:
                return [None] * len(q)
            dist, ids = faiss_ops.search(self._faiss, q, 1)
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
                faiss_ops.remove(self._faiss, opened)
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

    def add(self, edit_id: str, key: npt.ArrayLike, target: str, block: int) -> AddResult:
        """Insert one key by the rules in the module docstring."""
        vec = self._as_keys(key)
        if len(vec) != 1:
            raise ValueError(f"add takes one key, got {len(vec)}")
        with self._lock:
            self._check_same_key(edit_id, vec[0], target)
            row = self._append_key(vec[0], KeyMeta(edit_id, target, block, -1))
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
    ) -> list[AddResult]:
        """Insert a batch; first reject keys within the radius of each other with other targets."""
        vecs = self._as_keys(keys)
        if not len(edit_ids) == len(vecs) == len(targets):
            raise ValueError(f"{len(edit_ids)} ids, {len(vecs)} keys, {len(targets)} targets")
        self._check_batch_conflicts(edit_ids, vecs, targets)
        with self._lock:
            for e, v, t in zip(edit_ids, vecs, targets, strict=True):
                self._check_same_key(e, v, t)
            return [
                self.add(e, v[None, :], t, block)
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
        nearest = self._nearest(vec)
        if nearest is None or nearest[1] > nearest[0].radius:
            return "opened", self._open(row, self.radius), []
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
        cluster.radius = dist / 2.0
        new_id = self._open(row, dist / 2.0)
        log.info("neuron_clusters_split", cluster_id=cluster.cluster_id, new_cluster_id=new_id)
        return "split", new_id, [(r, cluster.cluster_id) for r in self._evict(cluster)]

    def _nearest(self, vec: F32) -> tuple[Cluster, float] | None:
        if not self._clusters:
            return None
        _, ids = faiss_ops.search(self._faiss, vec[None, :], 1)
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
        faiss_ops.add(self._faiss, centre[None, :], np.array([cid], dtype=np.int64))
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
            faiss_ops.remove(self._faiss, empty)
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
