"""The MELO block table, asserted whole after every operation."""

from __future__ import annotations

import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from daemon.editors.melo.allocator import BlockTable
from daemon.errors import BlockCapacityError, NeuronIndexError


def test_allocate_release_free_reuse_grow_table_after_each_step() -> None:
    """Each operation leaves exactly the expected table; freed ids are reused lowest first."""
    t = BlockTable(3)
    assert t.snapshot() == {"capacity": 3, "blocks": {}}
    assert t.allocate(["a", "b"]) == 0
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["a", "b"]}}
    assert t.allocate(["c"]) == 1
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["a", "b"], 1: ["c"]}}
    assert t.release_edits(["a"]) == []
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["b"], 1: ["c"]}}
    assert t.release_edits(["b"]) == [0]
    assert t.snapshot() == {"capacity": 3, "blocks": {1: ["c"]}}
    assert t.allocate(["d"]) == 0
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["d"], 1: ["c"]}}
    assert t.free(1) == ["c"]
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["d"]}}
    assert t.block_of("c") is None
    assert t.block_of("d") == 0
    assert t.edits_in(1) == []
    t.grow(5)
    assert t.snapshot() == {"capacity": 5, "blocks": {0: ["d"]}}
    assert (t.used, t.free_count, t.capacity) == (1, 4, 5)


def test_join_adds_edits_to_an_allocated_block_and_refuses_what_it_cannot_hold() -> None:
    """One subject's later edits join its block; a free block, an out-of-range block,
    an edit id that holds a block and an empty list are errors that change nothing."""
    t = BlockTable(3)
    t.allocate(["a"])
    t.join(0, ["b"])
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["a", "b"]}}
    assert t.block_of("b") == 0
    for block, ids, match in [
        (1, ["c"], "not allocated"),
        (3, ["c"], "outside"),
        (0, ["a"], "already hold"),
        (0, [], "at least one"),
    ]:
        with pytest.raises(ValueError, match=match):
            t.join(block, ids)
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["a", "b"]}}
    assert t.release_edits(["a", "b"]) == [0]


def test_full_table_raises_with_capacity_and_used_and_changes_nothing() -> None:
    """A full table rejects a batch loudly until a block is freed or capacity raised."""
    t = BlockTable(2)
    t.allocate(["a"])
    t.allocate(["b"])
    with pytest.raises(BlockCapacityError, match=r"capacity 2, used 2") as info:
        t.allocate(["c"])
    assert info.value.context == {"capacity": 2, "used": 2}
    assert t.snapshot() == {"capacity": 2, "blocks": {0: ["a"], 1: ["b"]}}
    t.grow(3)
    assert t.allocate(["c"]) == 2
    assert t.snapshot() == {"capacity": 3, "blocks": {0: ["a"], 1: ["b"], 2: ["c"]}}


def test_bad_operations_raise_and_leave_table_unchanged() -> None:
    """Duplicates, reused edit ids, unknown edits, bad blocks and shrinking are errors."""
    t = BlockTable(2)
    t.allocate(["a"])
    before = t.snapshot()
    with pytest.raises(ValueError, match="duplicate"):
        t.allocate(["x", "x"])
    with pytest.raises(ValueError, match="already hold"):
        t.allocate(["a"])
    with pytest.raises(ValueError, match="at least one"):
        t.allocate([])
    with pytest.raises(KeyError):
        t.release_edits(["a", "nope"])
    with pytest.raises(ValueError, match="not allocated"):
        t.free(1)
    with pytest.raises(ValueError, match="outside"):
        t.free(7)
    with pytest.raises(ValueError, match="only grow"):
        t.grow(1)
    assert t.snapshot() == before


def test_state_round_trips_through_json() -> None:
    """to_state is JSON-able, versioned, and from_state rebuilds the same table."""
    t = BlockTable(4)
    t.allocate(["a", "b"])
    t.allocate(["c"])
    t.release_edits(["a"])
    state = json.loads(json.dumps(t.to_state()))
    assert state["version"] == 1
    back = BlockTable.from_state(state)
    assert back.snapshot() == t.snapshot()
    assert back.block_of("c") == 1
    assert back.allocate(["d"]) == 2


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"version": 99, "capacity": 2, "blocks": {}}, "unknown version"),
        ({"version": 1, "capacity": 2, "blocks": {"0": ["a"], "1": ["a"]}}, "already hold"),
        ({"version": 1, "capacity": 2, "blocks": {"2": ["a"]}}, "outside capacity"),
        ({"version": 1, "capacity": 2, "blocks": {"0": []}}, "no edits"),
        ({"version": 1, "blocks": {}}, "malformed"),
    ],
)
def test_from_state_rejects_inconsistent_state(state: dict[str, object], message: str) -> None:
    """Bad versions, duplicate edits and out-of-range blocks raise NeuronIndexError."""
    with pytest.raises(NeuronIndexError, match=message):
        BlockTable.from_state(state)


class BlockTableMachine(RuleBasedStateMachine):
    """Random operation sequences against a plain dict model of the table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = BlockTable(4)
        self.model: dict[int, list[str]] = {}
        self.capacity = 4
        self.next_edit = 0

    def _new_ids(self, n: int) -> list[str]:
        ids = [f"e{self.next_edit + i}" for i in range(n)]
        self.next_edit += n
        return ids

    @rule(n=st.integers(1, 3))
    def allocate(self, n: int) -> None:
        ids = self._new_ids(n)
        if len(self.model) == self.capacity:
            with pytest.raises(BlockCapacityError):
                self.table.allocate(ids)
            return
        expected = min(set(range(self.capacity)) - set(self.model))
        assert self.table.allocate(ids) == expected
        self.model[expected] = ids

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        live = sorted(e for ids in self.model.values() for e in ids)
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        for block in list(self.model):
            self.model[block] = [e for e in self.model[block] if e not in chosen]
        expected = sorted(b for b, ids in self.model.items() if not ids)
        for block in expected:
            del self.model[block]
        assert self.table.release_edits(chosen) == expected

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(sorted(self.model)))
        assert self.table.free(block) == self.model.pop(block)

    @rule(extra=st.integers(0, 2))
    def grow(self, extra: int) -> None:
        self.capacity += extra
        self.table.grow(self.capacity)

    @rule()
    def round_trip(self) -> None:
        self.table = BlockTable.from_state(json.loads(json.dumps(self.table.to_state())))

    @invariant()
    def table_matches_model(self) -> None:
        assert self.table.snapshot() == {"capacity": self.capacity, "blocks": self.model}
        assert self.table.used + self.table.free_count == self.table.capacity
        owners = [e for ids in self.model.values() for e in ids]
        assert len(owners) == len(set(owners))  # no edit in two blocks
        for block, ids in self.model.items():
            assert all(self.table.block_of(e) == block for e in ids)


TestBlockTableMachine = BlockTableMachine.TestCase
TestBlockTableMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
