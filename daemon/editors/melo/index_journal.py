"""An undo journal for inserts into the neuron index: roll a batch back without a copy.

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

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon.editors.melo.index_records import Cluster, KeyMeta


@dataclass
class Journal:
    """The index's state at ``begin`` wherever an open insert transaction changed it."""

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
