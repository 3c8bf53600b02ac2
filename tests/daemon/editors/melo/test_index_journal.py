"""Neuron index transactions: begin / commit / rollback restore the index exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from daemon.editors.melo.index import NeuronIndex
from daemon.errors import EditConflictError, NeuronIndexError

DIM = 2


def _state_bytes(index: NeuronIndex) -> dict[str, Any]:
    """``to_state()`` with every array as raw bytes, for byte-for-byte comparison."""
    state = index.to_state()
    return {
        "manifest": state["manifest"],
        **{
            k: (state[k].dtype.str, state[k].shape, state[k].tobytes())
            for k in state
            if k != "manifest"
        },
    }


def _seeded(exact_max: int = 100) -> NeuronIndex:
    """Clusters around (0, 0) ("Paris", two keys) and (5, 0) ("Oslo"), radius 1."""
    index = NeuronIndex(DIM, radius=1.0, exact_max=exact_max, nlist=1)
    index.add("a", np.array([0.0, 0.0]), "Paris", block=0)
    index.add("b", np.array([0.5, 0.0]), "Paris", block=0)
    index.add("o", np.array([5.0, 0.0]), "Oslo", block=1)
    return index


def _mutate(index: NeuronIndex) -> None:
    """A join, a split that displaces a key (re-opened elsewhere) and a new cluster."""
    index.add("j", np.array([5.2, 0.0]), "Oslo", block=2)  # joins cluster 2
    index.add("c", np.array([0.0, 0.8]), "Rome", block=3)  # splits cluster 0, displaces b
    index.add("far", np.array([-9.0, 9.0]), "Lima", block=4)  # opens


@pytest.mark.parametrize("exact_max", [100, 4])
def test_rollback_restores_the_state_byte_for_byte(exact_max: int) -> None:
    """Joins, splits, displaced keys, new clusters (and a switch to IVF) are all undone."""
    index = _seeded(exact_max)
    before = _state_bytes(index)
    routes = index.query(np.array([[0.0, 0.0], [0.5, 0.0], [5.0, 0.0], [0.0, 0.8]]))
    index.begin()
    _mutate(index)
    assert index.key_count == 6 and index.is_approximate == (exact_max == 4)
    index.rollback()
    assert _state_bytes(index) == before
    assert index.query(np.array([[0.0, 0.0], [0.5, 0.0], [5.0, 0.0], [0.0, 0.8]])) == routes
    _mutate(index)  # the index works on as if the transaction never happened
    fresh = _seeded(exact_max)
    _mutate(fresh)
    assert _state_bytes(index) == _state_bytes(fresh)


def test_commit_keeps_the_inserts_and_ends_the_transaction() -> None:
    """After commit the keys stay; a second rollback or commit has nothing to act on."""
    index = _seeded()
    reference = _seeded()
    _mutate(reference)
    index.begin()
    _mutate(index)
    index.commit()
    assert _state_bytes(index) == _state_bytes(reference)
    with pytest.raises(NeuronIndexError, match="no insert transaction"):
        index.rollback()


def test_a_rejected_batch_inside_a_transaction_leaves_the_rest_undoable() -> None:
    """A conflicting batch changes nothing; what was added before it still rolls back."""
    index = _seeded()
    before = _state_bytes(index)
    index.begin()
    index.add("far", np.array([-9.0, 9.0]), "Lima", block=4)
    with pytest.raises(EditConflictError):
        index.add_batch(["x", "y"], np.array([[3.0, 3.0], [3.1, 3.0]]), ["A", "B"], block=5)
    index.rollback()
    assert _state_bytes(index) == before


def test_transactions_do_not_nest_and_forbid_removal() -> None:
    """One open transaction at a time; remove and reassign_blocks are refused inside one."""
    index = _seeded()
    index.begin()
    with pytest.raises(NeuronIndexError, match="already open"):
        index.begin()
    with pytest.raises(NeuronIndexError, match="remove is not allowed"):
        index.remove(["a"])
    with pytest.raises(NeuronIndexError, match="reassign_blocks is not allowed"):
        index.reassign_blocks([0])
    index.rollback()
    assert index.remove(["o"]) == [1]


def test_a_state_taken_earlier_does_not_change_with_the_index() -> None:
    """``to_state()`` copies the clusters' member lists: a later join leaves it alone."""
    index = _seeded()
    state = index.to_state()
    members = [c["edit_ids"] for c in state["manifest"]["clusters"]]
    index.add("j", np.array([5.2, 0.0]), "Oslo", block=2)
    assert [c["edit_ids"] for c in state["manifest"]["clusters"]] == members == [["a", "b"], ["o"]]
