"""The closed-form math of COMEBA-HK's consecutive batch updates, as pure functions.

Conventions (MEMIT's, in the ``[out, in]`` layout of ``daemon.model.arch``):

- ``d_in``: the input width of the MLP output projection (the key space);
- ``d_out``: its output width (the residual stream);
- keys ``K`` are columns, ``(d_in, n)``; residuals ``R = V* - W K`` are ``(d_out, n)``;
- ``C = E[k k^T]`` is the key covariance from text statistics, ``(d_in, d_in)``.

For one layer, a batch of ``n`` new keys on top of ``m`` earlier ones ``K_acc`` gets::

    delta = R K^T (lambda C + K_acc K_acc^T + K K^T)^-1        # (d_out, d_in)

``K_acc K_acc^T`` is kept as a running sum (``accumulate_outer``/``remove_outer``), so
the editor's state does not grow with the number of edits. Everything is computed in
float64; callers cast the result to the weight's dtype.
"""

from __future__ import annotations

import math as _m
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from daemon.errors import SolveError

log = structlog.get_logger()

RIDGE_STEPS: tuple[float, ...] = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
"""Relative ridge sizes tried in turn when the system is not positive definite.

Each is a multiple of ``trace(A) / d_in``, the system's mean eigenvalue, so the
ridge scales with the statistics rather than with an absolute constant.
"""


@dataclass(frozen=True)
class UpdateSolution:
    """A solved update and how it was obtained.

    ``ridge`` is the absolute amount added to the diagonal (0.0 when the plain
    Cholesky factorisation succeeded); ``ridge_attempts`` counts the retries.
    """

    delta: torch.Tensor  # (d_out, d_in), float64
    ridge: float
    ridge_attempts: int


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(dtype=torch.float64)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise SolveError(
            f"{name} holds {bad} non-finite value(s) (NaN/inf); the solve was aborted",
            tensor=name,
            shape=tuple(x.shape),
            non_finite=bad,
        )


def _check_shapes(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    acc_keys_outer: torch.Tensor,
) -> None:
    if residuals.dim() != 2 or keys.dim() != 2:
        raise ValueError(
            f"residuals and keys must be 2-D (d_out, n) and (d_in, n); got "
            f"{tuple(residuals.shape)} and {tuple(keys.shape)}"
        )
    d_in, n = keys.shape
    if residuals.shape[1] != n:
        raise ValueError(
            f"residuals have {residuals.shape[1]} columns but keys have {n} (one per edit)"
        )
    for name, mat in (("cov", cov), ("acc_keys_outer", acc_keys_outer)):
        if tuple(mat.shape) != (d_in, d_in):
            raise ValueError(f"{name} must be ({d_in}, {d_in}); got {tuple(mat.shape)}")


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Solve ``A X = B`` for symmetric ``A`` (d, d) and ``B`` (d, k) by Cholesky, in float64.

    When ``A`` is not (numerically) positive definite, retries with a ridge of
    ``eps * trace(A) / d`` for each ``eps`` in ``RIDGE_STEPS``. Returns
    ``(X, ridge, attempts)``; raises ``SolveError`` when every attempt fails.
    """
    a64, b64 = _f64(a), _f64(b)
    a64 = 0.5 * (a64 + a64.T)  # (d, d): symmetrise away round-off
    d = a64.shape[0]
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) == 0:
        return torch.cholesky_solve(b64, chol), 0.0, 0
    scale = float(torch.trace(a64)) / d
    scale = scale if _m.isfinite(scale) and scale > 0.0 else 1.0
    eye = torch.eye(d, dtype=torch.float64, device=a64.device)
    for attempt, eps in enumerate(RIDGE_STEPS, start=1):
        ridge = eps * scale
        chol, info = torch.linalg.cholesky_ex(a64 + ridge * eye)
        if int(info) == 0:
            log.warning("ridge_fallback_used", ridge=ridge, attempts=attempt, dim=d)
            return torch.cholesky_solve(b64, chol), ridge, attempt
    raise SolveError(
        f"the {d}x{d} system is not positive definite even with a ridge of "
        f"{RIDGE_STEPS[-1]:g} x trace/d",
        dim=d,
        trace=float(torch.trace(a64)),
    )


def solve_update(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    cov_weight: float,
    acc_keys_outer: torch.Tensor,
) -> UpdateSolution:
    """``consecutive_update`` with the ridge it needed (see there for the arguments)."""
    _check_shapes(residuals, keys, cov, acc_keys_outer)
    if not _m.isfinite(cov_weight) or cov_weight < 0.0:
        raise ValueError(f"cov_weight must be finite and >= 0; got {cov_weight}")
    r, k = _f64(residuals), _f64(keys)  # (d_out, n), (d_in, n)
    c, acc = _f64(cov), _f64(acc_keys_outer)  # (d_in, d_in) each
    for name, x in (("residuals", r), ("keys", k), ("cov", c), ("acc_keys_outer", acc)):
        _check_finite(name, x)
    a = cov_weight * c + acc + k @ k.T  # (d_in, d_in), symmetric
    # delta = R K^T A^-1  <=>  A delta^T = K R^T  (A symmetric): solve, never invert.
    x, ridge, attempts = solve_spd(a, k @ r.T)  # (d_in, d_out)
    delta = x.T  # (d_out, d_in)
    _check_finite("delta", delta)
    return UpdateSolution(delta=delta, ridge=ridge, ridge_attempts=attempts)


def consecutive_update(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    cov: torch.Tensor,
    cov_weight: float,
    acc_keys_outer: torch.Tensor,
) -> torch.Tensor:
    """The closed-form weight delta for one layer and one batch of edits, in float64.

    Args:
        residuals: ``R = V* - W K``, what the new keys' outputs must still move, (d_out, n).
        keys: the new keys ``K``, (d_in, n).
        cov: the key covariance ``C = E[k k^T]``, (d_in, d_in).
        cov_weight: ``lambda >= 0``, how strongly preserved keys (drawn from C) resist.
        acc_keys_outer: ``K_acc K_acc^T`` of all earlier edits, (d_in, d_in).

    Returns:
        ``R K^T (lambda C + K_acc K_acc^T + K K^T)^-1``, (d_out, d_in), float64.

    Raises:
        SolveError: NaN/inf in an input or in the result, or a system that stays
            indefinite after the ridge fallback.
    """
    return solve_update(residuals, keys, cov, cov_weight, acc_keys_outer).delta


def accumulate_outer(acc: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``acc + K K^T`` in float64: (d_in, d_in) + (d_in, n) (n, d_in)."""
    k = _f64(keys)  # (d_in, n)
    return _f64(acc) + k @ k.T  # (d_in, d_in)


def remove_outer(acc: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``acc - K K^T`` in float64, for retraction; undoes ``accumulate_outer(acc, keys)``.

    ``K K^T`` is computed by the same float64 product both ways, so the result
    equals the running sum without ``keys`` up to float64 round-off of the sum.
    """
    k = _f64(keys)  # (d_in, n)
    return _f64(acc) - k @ k.T  # (d_in, d_in)


def spread_residual(
    residual: torch.Tensor, layer_index: int, n_layers_remaining: int
) -> torch.Tensor:
    """The share of a residual that edited layer ``layer_index`` should take on, MEMIT-style.

    MEMIT edits its layers bottom-up; at each one it divides what is still missing
    by the number of edited layers not yet updated, this one included
    (``len(layers) - i``), so the residual is spread evenly and the last layer takes
    whatever the earlier ones left over. ``layer_index`` is the model layer (used
    only in messages); ``n_layers_remaining`` is that count, at least 1.
    """
    if n_layers_remaining < 1:
        raise ValueError(
            f"layer {layer_index}: n_layers_remaining must be >= 1; got {n_layers_remaining}"
        )
    return residual / n_layers_remaining


def update_norm_ratio(delta: torch.Tensor, w0: torch.Tensor) -> float:
    """``||delta||_F / ||W0||_F``: the size of an update relative to the base weight."""
    base = float(torch.linalg.matrix_norm(_f64(w0)))
    if base == 0.0:
        raise ValueError("the base weight has zero norm; the ratio is undefined")
    return float(torch.linalg.matrix_norm(_f64(delta))) / base


def is_outlier(value: float, history: Sequence[float], z: float, min_history: int = 5) -> bool:
    """Whether ``value`` lies more than ``z`` standard deviations ABOVE ``history``'s mean.

    One-sided: the collapse guard cares about updates that are too large, not
    too small. With fewer than ``min_history`` past values nothing is an outlier
    (there is no baseline yet). A non-finite ``value`` always is. The standard
    deviation (sample, ddof=1) is floored at ``1e-12 * max(1, |mean|)`` so a flat
    history still flags a jump.
    """
    if not _m.isfinite(value):
        return True
    past = [float(h) for h in history if _m.isfinite(h)]
    if len(past) < max(2, min_history):
        return False
    mean = sum(past) / len(past)
    var = sum((h - mean) ** 2 for h in past) / (len(past) - 1)
    std = max(_m.sqrt(var), 1e-12 * max(1.0, abs(mean)))
    return (value - mean) / std > z


def solve_from_sums(
    moment: torch.Tensor, key_outer: torch.Tensor, cov: torch.Tensor, cov_weight: float
) -> UpdateSolution:
    """The whole accumulated delta from running sums: ``M (lambda C + S)^-1``, float64.

    ``moment`` ``M = sum_i t_i k_i^T`` (d_out, d_in) and ``key_outer``
    ``S = sum_i k_i k_i^T`` (d_in, d_in) run over every live edit key ``k_i`` and the
    output ``t_i`` the delta must give it. This is the minimiser of
    ``lambda ||D C^1/2||^2 + sum_i ||D k_i - t_i||^2``; when each batch's ``t_i`` is
    taken as "what the current delta gives plus the batch's residual", it equals the
    sum of the consecutive updates (recursive least squares), so an edit is retracted
    exactly by subtracting its terms from ``M`` and ``S`` and solving again.
    """
    if moment.dim() != 2 or tuple(key_outer.shape) != (moment.shape[1], moment.shape[1]):
        raise ValueError(
            f"moment (d_out, d_in) and key_outer (d_in, d_in) do not fit: "
            f"{tuple(moment.shape)} and {tuple(key_outer.shape)}"
        )
    if tuple(cov.shape) != tuple(key_outer.shape):
        raise ValueError(f"cov must be {tuple(key_outer.shape)}; got {tuple(cov.shape)}")
    if not _m.isfinite(cov_weight) or cov_weight < 0.0:
        raise ValueError(f"cov_weight must be finite and >= 0; got {cov_weight}")
    m, s, c = _f64(moment), _f64(key_outer), _f64(cov)
    for name, x in (("moment", m), ("key_outer", s), ("cov", c)):
        _check_finite(name, x)
    x, ridge, attempts = solve_spd(cov_weight * c + s, m.T)  # (d_in, d_out)
    delta = x.T  # (d_out, d_in)
    _check_finite("delta", delta)
    return UpdateSolution(delta=delta, ridge=ridge, ridge_attempts=attempts)


@dataclass(frozen=True)
class FactorSolution:
    """``solve_from_sums``'s delta as ``up @ down`` (float64) and the ridge it needed."""

    up: torch.Tensor  # (d_out, r)
    down: torch.Tensor  # (r, d_in)
    ridge: float
    ridge_attempts: int


def solve_factors(
    keys: torch.Tensor,
    outputs: torch.Tensor,
    key_outer: torch.Tensor,
    cov: torch.Tensor,
    cov_weight: float,
) -> FactorSolution:
    """``solve_from_sums``'s delta in factored form, from the rows the sums hold.

    With the live keys ``K`` ``(d_in, r)`` and their outputs ``T`` ``(d_out, r)``
    (so that ``M = T K^T``), ``M (lambda C + S)^-1 = T (A^-1 K)^T`` for the symmetric
    ``A = lambda C + S``: ``up = T``, ``down = (A^-1 K)^T``, of rank at most ``r``.
    One Cholesky factorisation and ``r`` right-hand sides instead of ``d_out``.
    """
    if keys.dim() != 2 or outputs.dim() != 2 or keys.shape[1] != outputs.shape[1]:
        raise ValueError(
            f"keys (d_in, r) and outputs (d_out, r) do not fit: "
            f"{tuple(keys.shape)} and {tuple(outputs.shape)}"
        )
    d_in = keys.shape[0]
    if tuple(key_outer.shape) != (d_in, d_in) or tuple(cov.shape) != (d_in, d_in):
        raise ValueError(
            f"key_outer and cov must be ({d_in}, {d_in}); got "
            f"{tuple(key_outer.shape)} and {tuple(cov.shape)}"
        )
    if not _m.isfinite(cov_weight) or cov_weight < 0.0:
        raise ValueError(f"cov_weight must be finite and >= 0; got {cov_weight}")
    k, t, s, c = _f64(keys), _f64(outputs), _f64(key_outer), _f64(cov)
    for name, x in (("keys", k), ("outputs", t), ("key_outer", s), ("cov", c)):
        _check_finite(name, x)
    x, ridge, attempts = solve_spd(cov_weight * c + s, k)  # (d_in, r)
    down = x.T  # (r, d_in)
    _check_finite("delta", down)
    return FactorSolution(up=t, down=down, ridge=ridge, ridge_attempts=attempts)
