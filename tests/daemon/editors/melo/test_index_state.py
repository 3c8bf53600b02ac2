"""Neuron index additions for the editor: copies, in-memory state, block reassignment."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.editors.melo.index import NeuronIndex
from daemon.errors import NeuronIndexError

DIM = 8


def _keys(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, DIM)) * 10.0).astype(np.float32)


@pytest.mark.parametrize("exact_max", [100, 2])
def test_state_and_copy_answer_like_the_original_and_are_independent(exact_max: int) -> None:
    """to_state/from_state and copy() give equal routes; changing a copy leaves the original."""
    index = NeuronIndex(DIM, radius=1.0, exact_max=exact_max, nlist=2)
    keys = _keys(6)
    for i, k in enumerate(keys):
        index.add(f"e{i}", k, f"t{i}", block=i)
    queries = np.concatenate([keys, keys + 0.3, _keys(4, seed=9)])
    restored = NeuronIndex.from_state(index.to_state())
    twin = index.copy()
    assert restored.query(queries) == index.query(queries) == twin.query(queries)
    assert restored.is_approximate == index.is_approximate == (exact_max == 2)
    twin.remove(["e0"])
    twin.add("new", keys[1] + 0.1, "t1", block=9)
    assert index.query(keys[:1])[0] is not None and twin.query(keys[:1])[0] is None
    assert index.key_count == 6 and twin.key_count == 6


def test_from_state_rejects_other_versions_and_mismatched_arrays() -> None:
    """A state whose version or array shapes do not fit raises NeuronIndexError."""
    index = NeuronIndex(DIM, radius=1.0)
    index.add("a", _keys(1)[0], "t", block=0)
    state = index.to_state()
    with pytest.raises(NeuronIndexError, match="version"):
        NeuronIndex.from_state({**state, "manifest": {**state["manifest"], "version": 9}})
    with pytest.raises(NeuronIndexError, match="do not fit"):
        NeuronIndex.from_state({**state, "keys": np.zeros((2, DIM), np.float32)})


def test_keys_can_be_added_after_every_key_was_removed() -> None:
    """Emptying the index and adding again works (the key buffer regrows from empty)."""
    index = NeuronIndex(DIM, radius=1.0)
    keys = _keys(2)
    index.add("a", keys[0], "t", block=0)
    index.remove(["a"])
    index.copy().add("b", keys[1], "t", block=1)
    index.add("b", keys[1], "t", block=1)
    assert index.query(keys[1:])[0] is not None


def test_reassign_blocks_points_a_freed_cluster_at_a_live_member_block() -> None:
    """A joined key keeps routing after its cluster's block is freed: to its own block."""
    index = NeuronIndex(DIM, radius=1.0)
    key = _keys(1)[0]
    index.add("owner", key, "Paris", block=3)
    joined = index.add("joiner", key + 0.2, "Paris", block=5)
    assert joined.action == "joined" and joined.block == 3
    index.remove(["owner"])
    assert index.reassign_blocks([3]) == [(joined.cluster_id, 3, 5)]
    route = index.query(key + 0.2)[0]
    assert route is not None and route.block == 5
    assert index.reassign_blocks([7]) == []
    with pytest.raises(NeuronIndexError, match="no member key"):
        index.reassign_blocks([5])
