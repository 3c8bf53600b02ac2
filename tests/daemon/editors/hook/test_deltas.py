"""Shard deltas: dense or two factors, the same outputs, norms and state entries."""

from __future__ import annotations

import pytest
import torch

from daemon.editors.hook.deltas import (
    ShardDelta,
    frobenius,
    from_entries,
    state_entries,
    use_factors,
)

F32, F64 = torch.float32, torch.float64


def _factored(d_out: int, d_in: int, r: int, seed: int) -> ShardDelta:
    g = torch.Generator().manual_seed(seed)
    return ShardDelta(up=torch.randn(d_out, r, generator=g), down=torch.randn(r, d_in, generator=g))


def test_factors_are_used_only_while_smaller_than_dense() -> None:
    """r (d_out + d_in) < d_out d_in: 192 x 512 switches between rank 139 and 140."""
    assert use_factors(139, 192, 512) and not use_factors(140, 192, 512)
    assert use_factors(0, 4, 6) and not use_factors(3, 4, 6)


def test_a_factored_delta_applies_as_its_dense_product() -> None:
    delta = _factored(12, 20, 3, seed=0)
    dense = ShardDelta(dense=delta.to_dense())
    x = torch.randn(7, 20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(delta.apply(x), dense.apply(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.apply(x.double()), x.double() @ delta.to_dense(F64).T)
    assert delta.nbytes == (12 + 20) * 3 * 4 and dense.nbytes == 12 * 20 * 4


def test_the_zero_delta_has_rank_zero_and_gives_zeros() -> None:
    zero = ShardDelta.zero(4, 6, "cpu")
    assert zero.rank == 0 and zero.factored and not zero.nonzero() and zero.nbytes == 0
    assert torch.equal(zero.apply(torch.randn(3, 6)), torch.zeros(3, 4))
    assert frobenius(zero) == 0.0


def test_norms_of_factored_differences_match_the_dense_norm() -> None:
    a, b = _factored(12, 20, 3, seed=0), _factored(12, 20, 5, seed=1)
    dense_a, dense_b = ShardDelta(dense=a.to_dense()), ShardDelta(dense=b.to_dense())
    expected = float(torch.linalg.matrix_norm(a.to_dense(F64) - b.to_dense(F64)))
    assert frobenius(a, b) == pytest.approx(expected, rel=1e-9)
    assert frobenius(dense_a, b) == pytest.approx(expected, rel=1e-9)
    assert frobenius(a) == pytest.approx(float(torch.linalg.matrix_norm(a.to_dense(F64))))
    assert frobenius(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frobenius(dense_a, dense_b) == pytest.approx(expected, rel=1e-6)


def test_state_entries_round_trip_both_layouts() -> None:
    deltas = [
        _factored(4, 6, 2, seed=0),
        ShardDelta(dense=torch.randn(4, 6)),
        ShardDelta.zero(4, 6, "cpu"),
    ]
    entries = state_entries(deltas)
    assert set(entries) == {"delta_up.0", "delta_down.0", "delta.1", "delta_up.2", "delta_down.2"}
    back = from_entries(entries, "cpu")
    assert back is not None and [d.factored for d in back] == [True, False, True]
    for got, want in zip(back, deltas, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got.tensors(), want.tensors(), strict=True))


def test_the_version_2_dense_stack_still_reads() -> None:
    stack = torch.randn(3, 4, 6)
    back = from_entries({"delta": stack}, "cpu")
    assert back is not None and len(back) == 3 and not any(d.factored for d in back)
    assert all(torch.equal(d.to_dense(), stack[s]) for s, d in enumerate(back))
    assert from_entries({"keys": torch.zeros(0, 6)}, "cpu") is None


def test_a_gap_or_a_lone_factor_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not 0\.\.1"):
        from_entries({"delta.0": torch.zeros(4, 6), "delta.2": torch.zeros(4, 6)}, "cpu")
    with pytest.raises(ValueError, match="neither"):
        from_entries({"delta_up.0": torch.zeros(4, 1)}, "cpu")
    with pytest.raises(ValueError, match="do not multiply"):
        ShardDelta(up=torch.zeros(4, 2), down=torch.zeros(3, 6))
