"""The prompt-key table: a Mapping over one growable matrix."""

from __future__ import annotations

import numpy as np

from daemon.editors.melo.key_table import KeyTable


def test_rows_follow_adds_and_removals_past_a_regrowth() -> None:
    """Every id maps to its key after 100 adds (buffer doubled) and swap-removals."""
    rng = np.random.default_rng(0)
    table = KeyTable(3)
    want = {f"e{i}": rng.normal(size=3).astype(np.float32) for i in range(100)}
    for edit_id, key in want.items():
        table[edit_id] = key
    for edit_id in ("e0", "e50", "e99"):
        del table[edit_id]
        del want[edit_id]
    assert len(table) == len(want) and set(table) == set(want)
    for edit_id, key in want.items():
        assert np.array_equal(table[edit_id], key)
    rows = dict(zip(table.ids(), table.matrix(), strict=True))
    assert all(np.array_equal(rows[e], k) for e, k in want.items())
