"""The collapse guard: no verdict on a short history, a jump refused on a long one."""

from __future__ import annotations

import pytest

from daemon.editors.hook.solve import GUARD_MIN_HISTORY, guard_update
from daemon.errors import SolveError


def test_a_short_history_takes_an_ordinary_batch_and_grows() -> None:
    history = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]  # tight: 1.35 is a z > 6 outlier
    guard_update(2, 1.35, history, max_zscore=6.0)
    assert history[-1] == 1.35 and len(history) == 8


def test_a_long_history_refuses_a_jump_and_keeps_the_history() -> None:
    history = [1.0 + 0.01 * (i % 3) for i in range(GUARD_MIN_HISTORY)]
    with pytest.raises(SolveError, match="collapse guard"):
        guard_update(3, 3.0, history, max_zscore=6.0)
    assert len(history) == GUARD_MIN_HISTORY  # a refused batch is not history
    guard_update(3, 1.02, history, max_zscore=6.0)
    assert len(history) == GUARD_MIN_HISTORY + 1


def test_a_non_finite_norm_is_refused_at_once() -> None:
    with pytest.raises(SolveError):
        guard_update(2, float("inf"), [], max_zscore=6.0)
