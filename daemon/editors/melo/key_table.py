"""The applied edits' prompt keys as one growable matrix (edit id -> row).

``verify.watch_routes`` compares every applied prompt key with each batch's new
keys. Stacking N separate arrays for that cost ~2 us per key (4 ms at 2,000
edits, per batch); here the keys already lie in one ``(N, d)`` buffer that
doubles when full, and a removal moves the last row into the hole, so adding
and removing are O(d) and the matrix is a view. Row order is not edit order:
callers that need an order (the editor's state) look keys up by id.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


class KeyTable(Mapping[str, F32]):
    """Edit id -> float32 key ``(d,)``, stored as rows of one ``(N, d)`` matrix."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._buf: F32 = np.zeros((64, dim), dtype=np.float32)
        self._ids: list[str] = []  # row -> edit id
        self._rows: dict[str, int] = {}  # edit id -> row

    def __getitem__(self, edit_id: str) -> F32:
        key: F32 = self._buf[self._rows[edit_id]].copy()
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __setitem__(self, edit_id: str, key: F32) -> None:
        row = self._rows.get(edit_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._buf):  # double: amortised O(d) per key
                grown = np.zeros((2 * len(self._buf), self.dim), dtype=np.float32)
                grown[:row] = self._buf[:row]
                self._buf = grown
            self._ids.append(edit_id)
            self._rows[edit_id] = row
        self._buf[row] = np.asarray(key, dtype=np.float32).reshape(self.dim)

    def __delitem__(self, edit_id: str) -> None:
        row = self._rows.pop(edit_id)
        last = len(self._ids) - 1
        moved = self._ids.pop()
        if row != last:  # the last row fills the hole
            self._buf[row] = self._buf[last]
            self._ids[row] = moved
            self._rows[moved] = row

    def ids(self) -> list[str]:
        """The edit id of each row of ``matrix()``."""
        return list(self._ids)

    def matrix(self) -> F32:
        """``(N, d)`` float32, row i the key of ``ids()[i]`` (a view: do not keep it)."""
        return self._buf[: len(self._ids)]
