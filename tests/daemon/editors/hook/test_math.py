"""The closed-form consecutive update, against naive float64 references and its properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.editors.hook.math import (
    accumulate_outer,
    consecutive_update,
    is_outlier,
    remove_outer,
    solve_factors,
    solve_from_sums,
    solve_update,
    spread_residual,
    update_norm_ratio,
)
from daemon.errors import SolveError

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, g: torch.Generator) -> torch.Tensor:
    """A well-conditioned covariance: I + G G^T / d, (d, d)."""
    m = torch.randn(d, d, generator=g, dtype=F64)
    return torch.eye(d, dtype=F64) + m @ m.T / d


def _reference(
    r: torch.Tensor, k: torch.Tensor, c: torch.Tensor, lam: float, acc: torch.Tensor
) -> torch.Tensor:
    out: torch.Tensor = r @ k.T @ torch.linalg.inv(lam * c + acc + k @ k.T)
    return out


def test_matches_naive_reference() -> None:
    """The Cholesky solve equals R K^T inv(lambda C + K_acc K_acc^T + K K^T)."""
    g = _gen(0)
    d_in, d_out, n, m = 12, 7, 4, 5
    c = _spd(d_in, g)
    k_acc = torch.randn(d_in, m, generator=g, dtype=F64)
    k = torch.randn(d_in, n, generator=g, dtype=F64)
    r = torch.randn(d_out, n, generator=g, dtype=F64)
    acc = accumulate_outer(torch.zeros(d_in, d_in, dtype=F64), k_acc)
    got = consecutive_update(r, k, c, 2.5, acc)
    assert got.dtype == F64
    assert got.shape == (d_out, d_in)
    torch.testing.assert_close(got, _reference(r, k, c, 2.5, acc), rtol=1e-10, atol=1e-12)


def test_float32_inputs_are_solved_in_float64() -> None:
    """Lower-precision inputs give a float64 result equal to the float64 solve."""
    g = _gen(1)
    c = _spd(6, g)
    k = torch.randn(6, 2, generator=g, dtype=F64)
    r = torch.randn(3, 2, generator=g, dtype=F64)
    acc = torch.zeros(6, 6, dtype=F64)
    got = consecutive_update(r.float(), k.float(), c.float(), 1.0, acc.float())
    want = consecutive_update(r.float().double(), k.float().double(), c.float().double(), 1.0, acc)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_update_maps_new_keys_to_targets_when_lambda_is_small() -> None:
    """With a tiny covariance weight and n <= d_in, (W + delta) K = V*."""
    g = _gen(2)
    d_in, d_out, n = 10, 6, 4
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    k = torch.randn(d_in, n, generator=g, dtype=F64)
    v_star = torch.randn(d_out, n, generator=g, dtype=F64)
    delta = consecutive_update(v_star - w @ k, k, _spd(d_in, g), 1e-9, torch.zeros(d_in, d_in))
    torch.testing.assert_close((w + delta) @ k, v_star, rtol=1e-6, atol=1e-6)


def test_larger_lambda_shrinks_update_and_moves_preserved_keys_less() -> None:
    """As lambda grows, ||delta|| falls and keys drawn from C move less."""
    g = _gen(3)
    d_in, d_out, n = 10, 6, 3
    c = _spd(d_in, g)
    preserved = torch.linalg.cholesky(c) @ torch.randn(d_in, 200, generator=g, dtype=F64)
    k = torch.randn(d_in, n, generator=g, dtype=F64)
    r = torch.randn(d_out, n, generator=g, dtype=F64)
    acc = torch.zeros(d_in, d_in, dtype=F64)
    norms, moves = [], []
    for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
        delta = consecutive_update(r, k, c, lam, acc)
        norms.append(float(delta.norm()))
        moves.append(float((delta @ preserved).norm()))
    assert norms == sorted(norms, reverse=True)
    assert moves == sorted(moves, reverse=True)
    assert moves[-1] < 0.1 * moves[0]


def test_consecutive_batches_equal_one_joint_solve() -> None:
    """Two consecutive batches give the same weights as solving both batches at once from W0."""
    g = _gen(4)
    d_in, d_out = 9, 5
    c, lam = _spd(d_in, g), 3.0
    w0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    k1, k2 = (torch.randn(d_in, 3, generator=g, dtype=F64) for _ in range(2))
    v1, v2 = (torch.randn(d_out, 3, generator=g, dtype=F64) for _ in range(2))
    zeros = torch.zeros(d_in, d_in, dtype=F64)

    w1 = w0 + consecutive_update(v1 - w0 @ k1, k1, c, lam, zeros)
    w2 = w1 + consecutive_update(v2 - w1 @ k2, k2, c, lam, accumulate_outer(zeros, k1))

    k_all, v_all = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
    joint = w0 + consecutive_update(v_all - w0 @ k_all, k_all, c, lam, zeros)
    torch.testing.assert_close(w2, joint, rtol=1e-10, atol=1e-10)


def test_consecutive_equals_all_keys_with_satisfied_earlier_residuals() -> None:
    """Earlier keys in the accumulated term act like earlier keys with zero residual."""
    g = _gen(5)
    d_in, d_out = 8, 4
    c = _spd(d_in, g)
    k_old = torch.randn(d_in, 5, generator=g, dtype=F64)
    k_new = torch.randn(d_in, 2, generator=g, dtype=F64)
    r_new = torch.randn(d_out, 2, generator=g, dtype=F64)
    zeros = torch.zeros(d_in, d_in, dtype=F64)
    consecutive = consecutive_update(r_new, k_new, c, 0.5, accumulate_outer(zeros, k_old))
    r_all = torch.cat([torch.zeros(d_out, 5, dtype=F64), r_new], 1)
    at_once = consecutive_update(r_all, torch.cat([k_old, k_new], 1), c, 0.5, zeros)
    torch.testing.assert_close(consecutive, at_once, rtol=1e-10, atol=1e-12)


def test_accumulate_then_remove_restores_the_sum() -> None:
    """Removing a batch's keys undoes adding them: exactly from zero, to round-off otherwise."""
    g = _gen(6)
    d = 7
    zeros = torch.zeros(d, d, dtype=F64)
    k = torch.randn(d, 3, generator=g, dtype=F64)
    assert torch.equal(remove_outer(accumulate_outer(zeros, k), k), zeros)

    base = accumulate_outer(zeros, torch.randn(d, 20, generator=g, dtype=F64))
    back = remove_outer(accumulate_outer(base, k), k)
    assert back.dtype == F64
    torch.testing.assert_close(back, base, rtol=0, atol=1e-12)


def test_singular_system_uses_ridge_fallback_and_stays_finite() -> None:
    """An indefinite system is retried with a ridge, logged, and still returns finite values."""
    d_in = 6
    k = torch.randn(d_in, 2, generator=_gen(7), dtype=F64)
    k[-1] = 0.0  # a zero row and column in A: Cholesky's last pivot is exactly 0
    r = torch.randn(3, 2, generator=_gen(8), dtype=F64)
    zeros = torch.zeros(d_in, d_in, dtype=F64)
    with capture_logs() as logs:
        sol = solve_update(r, k, zeros, 0.0, zeros)
    assert sol.ridge > 0.0
    assert sol.ridge_attempts >= 1
    assert bool(torch.isfinite(sol.delta).all())
    assert any(e["event"] == "ridge_fallback_used" for e in logs)


@pytest.mark.parametrize("where", ["residuals", "keys", "cov", "acc_keys_outer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_solve_error(where: str, bad: float) -> None:
    """NaN/inf in any input aborts the solve with a SolveError naming the tensor."""
    g = _gen(9)
    args = {
        "residuals": torch.randn(3, 2, generator=g, dtype=F64),
        "keys": torch.randn(4, 2, generator=g, dtype=F64),
        "cov": _spd(4, g),
        "acc_keys_outer": torch.zeros(4, 4, dtype=F64),
    }
    args[where][0, 0] = bad
    with pytest.raises(SolveError, match=where) as info:
        consecutive_update(
            args["residuals"], args["keys"], args["cov"], 1.0, args["acc_keys_outer"]
        )
    assert info.value.context["tensor"] == where


def test_shape_mismatch_is_a_value_error() -> None:
    """Residuals and keys must have one column per edit; covariances must be (d_in, d_in)."""
    with pytest.raises(ValueError, match="columns"):
        consecutive_update(torch.zeros(3, 2), torch.zeros(4, 3), torch.eye(4), 1.0, torch.eye(4))
    with pytest.raises(ValueError, match="cov"):
        consecutive_update(torch.zeros(3, 2), torch.zeros(4, 2), torch.eye(3), 1.0, torch.eye(4))


@settings(max_examples=60, deadline=None)
@given(
    d_in=st.integers(2, 8),
    d_out=st.integers(1, 6),
    n=st.integers(1, 4),
    m=st.integers(0, 4),
    lam=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_finite_and_matches_reference(
    d_in: int, d_out: int, n: int, m: int, lam: float, seed: int
) -> None:
    """On random small well-conditioned systems the result is finite and equals the reference."""
    g = _gen(seed)
    c = _spd(d_in, g)
    acc = accumulate_outer(torch.zeros(d_in, d_in), torch.randn(d_in, m, generator=g, dtype=F64))
    k = torch.randn(d_in, n, generator=g, dtype=F64)
    r = torch.randn(d_out, n, generator=g, dtype=F64)
    got = consecutive_update(r, k, c, lam, acc)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, _reference(r, k, c, lam, acc), rtol=1e-8, atol=1e-10)


def test_spread_residual_divides_by_layers_remaining() -> None:
    """MEMIT's spread: each layer takes residual / (edited layers left, this one included)."""
    r = torch.full((4, 2), 6.0)
    torch.testing.assert_close(spread_residual(r, 3, 3), torch.full((4, 2), 2.0))
    torch.testing.assert_close(spread_residual(r, 5, 1), r)
    with pytest.raises(ValueError, match="layer 5"):
        spread_residual(r, 5, 0)


def test_update_norm_ratio() -> None:
    """||delta||_F / ||W0||_F, as a float; a zero base weight is rejected."""
    w0 = torch.ones(2, 2)  # norm 2
    assert update_norm_ratio(torch.full((2, 2), 0.5), w0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="zero norm"):
        update_norm_ratio(w0, torch.zeros(2, 2))


def test_is_outlier() -> None:
    """One-sided z-score against history; no verdict before min_history; NaN is an outlier."""
    hist = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert not is_outlier(1.1, hist, z=4.0)
    assert is_outlier(5.0, hist, z=4.0)
    assert not is_outlier(-5.0, hist, z=4.0)  # a small update is not a collapse sign
    assert not is_outlier(100.0, hist[:3], z=4.0)  # too little history
    assert is_outlier(float("nan"), [], z=4.0)
    assert is_outlier(1.5, [1.0] * 6, z=4.0)  # flat history still flags a jump
    assert not is_outlier(1.0, [1.0] * 6, z=4.0)


def test_solving_from_running_sums_equals_the_consecutive_updates() -> None:
    """Recursive least squares: the sum of consecutive updates is the joint solve."""

    gen = torch.Generator().manual_seed(7)
    d_in, d_out = 12, 5
    a = torch.randn(d_in, 3 * d_in, generator=gen, dtype=torch.float64)
    cov = a @ a.T / (3 * d_in)
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    acc = torch.zeros(d_in, d_in, dtype=torch.float64)
    moment = torch.zeros(d_out, d_in, dtype=torch.float64)
    for _ in range(4):
        keys = torch.randn(d_in, 3, generator=gen, dtype=torch.float64)
        wanted = torch.randn(d_out, 3, generator=gen, dtype=torch.float64)
        residual = wanted - delta @ keys
        delta = delta + consecutive_update(residual, keys, cov, 2.0, acc)
        moment = moment + wanted @ keys.T  # t = what the delta must give = wanted
        acc = accumulate_outer(acc, keys)
    joint = solve_from_sums(moment, acc, cov, 2.0).delta
    assert torch.allclose(joint, delta, atol=1e-9)


def test_factored_solve_equals_the_dense_solve_from_sums() -> None:
    """``T (A^-1 K)^T`` is ``M (lambda C + S)^-1`` when the sums hold exactly K and T."""
    g = _gen(7)
    d_in, d_out, r = 12, 5, 3
    k = torch.randn(d_in, r, generator=g, dtype=F64)
    t = torch.randn(d_out, r, generator=g, dtype=F64)
    c = _spd(d_in, g)
    dense = solve_from_sums(t @ k.T, k @ k.T, c, 2.0).delta
    factors = solve_factors(k, t, k @ k.T, c, 2.0)
    assert factors.up.shape == (d_out, r) and factors.down.shape == (r, d_in)
    torch.testing.assert_close(factors.up @ factors.down, dense, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        solve_factors(k, t[:, :2], k @ k.T, c, 2.0)
    with pytest.raises(SolveError, match="non-finite"):
        solve_factors(k, t * float("nan"), k @ k.T, c, 2.0)
