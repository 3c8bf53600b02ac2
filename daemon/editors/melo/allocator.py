"""MELO's block table: LoRA rank split into non-overlapping blocks, one per edit group.

A group is a batch of ``edits_per_block`` edits, or (subject keys) one subject's
edits, which later edits of that subject ``join``.

The table is explicit (after vllm's LoRA slot manager): ``capacity`` block ids
``0 .. capacity-1``, each either free or holding the ids of the edits trained
into it. Allocation takes the lowest free id, so a freed block is reused
first. A full table raises :class:`BlockCapacityError` (and logs
``block_allocation_refused``); it never silently trains nothing.

``snapshot()`` gives the whole table as plain data so tests can assert it after
every operation; ``to_state()``/``from_state()`` persist it with a version.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any

import structlog

from daemon.errors import BlockCapacityError, NeuronIndexError

STATE_VERSION = 1

log = structlog.get_logger()


class BlockTable:
    """Which edit ids live in which LoRA block; ``capacity`` blocks in all."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"block table capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._blocks: dict[int, list[str]] = {}  # block id -> edit ids (allocated only)
        self._edit_block: dict[str, int] = {}  # edit id -> block id
        # Free ids: every id >= _next, and the heap of freed ids below it (O(log n) allocate).
        self._next = 0
        self._freed: list[int] = []

    # --- queries ---------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return len(self._blocks)

    @property
    def free_count(self) -> int:
        return self._capacity - len(self._blocks)

    def block_of(self, edit_id: str) -> int | None:
        """The block holding ``edit_id``, or None when it holds no block."""
        return self._edit_block.get(edit_id)

    def edits_in(self, block: int) -> list[str]:
        """The edit ids in ``block`` (empty when the block is free)."""
        self._check_range(block)
        return list(self._blocks.get(block, []))

    def snapshot(self) -> dict[str, Any]:
        """The whole table: capacity and every allocated block with its edits."""
        return {
            "capacity": self._capacity,
            "blocks": {b: list(self._blocks[b]) for b in sorted(self._blocks)},
        }

    # --- changes ---------------------------------------------------------------------

    def allocate(self, edit_ids: Sequence[str]) -> int:
        """Give the edits the lowest free block; raise BlockCapacityError when full."""
        ids = list(edit_ids)
        self._check_new_edits(ids)
        if self.free_count == 0:
            log.warning("block_allocation_refused", capacity=self._capacity, used=self.used)
            raise BlockCapacityError(
                f"MELO block table is full (capacity {self._capacity}, used {self.used}): "
                "retract edits to free blocks or raise the capacity",
                capacity=self._capacity,
                used=self.used,
            )
        if self._freed:
            block = heapq.heappop(self._freed)
        else:
            block, self._next = self._next, self._next + 1
        self._blocks[block] = ids
        for edit_id in ids:
            self._edit_block[edit_id] = block
        log.info("block_allocated", block=block, edit_ids=ids, used=self.used)
        return block

    def join(self, block: int, edit_ids: Sequence[str]) -> None:
        """Add edits to the allocated ``block`` (edits that share it: one subject's)."""
        ids = list(edit_ids)
        self._check_range(block)
        if block not in self._blocks:
            raise ValueError(f"block {block} is not allocated")
        self._check_new_edits(ids)
        self._blocks[block].extend(ids)
        for edit_id in ids:
            self._edit_block[edit_id] = block
        log.info("block_joined", block=block, edit_ids=ids, used=self.used)

    def release_edits(self, edit_ids: Iterable[str]) -> list[int]:
        """Drop the edits; return (sorted) the blocks freed because no live edit is left.

        Unknown edit ids raise KeyError before anything changes.
        """
        ids = list(dict.fromkeys(edit_ids))
        unknown = [e for e in ids if e not in self._edit_block]
        if unknown:
            raise KeyError(f"edit ids hold no block: {unknown}")
        touched: set[int] = set()
        for edit_id in ids:
            block = self._edit_block.pop(edit_id)
            self._blocks[block].remove(edit_id)
            touched.add(block)
        freed = sorted(b for b in touched if not self._blocks[b])
        for block in freed:
            del self._blocks[block]
            heapq.heappush(self._freed, block)
        log.info("block_edits_released", edit_ids=ids, freed_blocks=freed, used=self.used)
        return freed

    def free(self, block: int) -> list[str]:
        """Free ``block`` whatever it holds; return the edit ids it held."""
        self._check_range(block)
        if block not in self._blocks:
            raise ValueError(f"block {block} is not allocated")
        edits = self._blocks.pop(block)
        heapq.heappush(self._freed, block)
        for edit_id in edits:
            del self._edit_block[edit_id]
        log.info("block_freed", block=block, edit_ids=edits, used=self.used)
        return edits

    def grow(self, new_capacity: int) -> None:
        """Raise the capacity; a smaller capacity is an error (blocks are never moved)."""
        if new_capacity < self._capacity:
            raise ValueError(
                f"block table capacity can only grow: {new_capacity} < {self._capacity}"
            )
        self._capacity = new_capacity
        log.info("block_table_grown", capacity=new_capacity, used=self.used)

    def resize(self, capacity: int) -> None:
        """Set the capacity, larger or smaller, as long as every allocated block fits."""
        if capacity < 1 or any(b >= capacity for b in self._blocks):
            raise ValueError(
                f"block table capacity {capacity} does not hold blocks {sorted(self._blocks)}"
            )
        self._capacity = capacity
        self._freed = [b for b in self._freed if b < capacity]  # a sorted prefix: still a heap
        log.info("block_table_resized", capacity=capacity, used=self.used)

    # --- state -----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON-able dict (block ids as strings, as JSON object keys must be)."""
        return {
            "version": STATE_VERSION,
            "capacity": self._capacity,
            "blocks": {str(b): list(self._blocks[b]) for b in sorted(self._blocks)},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BlockTable:
        """Rebuild a table; raise NeuronIndexError when the state is not consistent."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise NeuronIndexError(
                f"block table state has unknown version {version!r} (expected {STATE_VERSION})"
            )
        try:
            table = cls(int(state["capacity"]))
            blocks = {int(b): list(e) for b, e in dict(state["blocks"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise NeuronIndexError(f"block table state is malformed: {exc}") from exc
        for block, edits in sorted(blocks.items()):
            if not 0 <= block < table.capacity:
                raise NeuronIndexError(
                    f"block table state has block {block} outside capacity {table.capacity}"
                )
            if not edits:
                raise NeuronIndexError(f"block table state has block {block} with no edits")
            try:
                table._check_new_edits(edits)
            except ValueError as exc:
                raise NeuronIndexError(f"block table state, block {block}: {exc}") from exc
            table._blocks[block] = edits
            table._edit_block.update(dict.fromkeys(edits, block))
        table._next = max(blocks, default=-1) + 1
        table._freed = [b for b in range(table._next) if b not in blocks]  # sorted: a heap
        return table

    # --- checks ----------------------------------------------------------------------

    def _check_range(self, block: int) -> None:
        if not 0 <= block < self._capacity:
            raise ValueError(f"block {block} is outside 0..{self._capacity - 1}")

    def _check_new_edits(self, ids: list[str]) -> None:
        if not ids:
            raise ValueError("a block needs at least one edit id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate edit ids: {sorted({e for e in ids if ids.count(e) > 1})}")
        taken = {e: self._edit_block[e] for e in ids if e in self._edit_block}
        if taken:
            raise ValueError(f"edit ids already hold a block: {taken}")
