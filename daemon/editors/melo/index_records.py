"""The neuron-key index's records: routes, insertion results and clusters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from daemon.editors.melo.faiss_ops import F32


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
    """One stored key: its edit, target, block and cluster."""

    edit_id: str
    target: str
    block: int
    cluster_id: int
