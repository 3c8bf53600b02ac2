"""L2 distances between neuron keys, and the radius rule built on them (pure functions).

Distances are plain Euclidean (L2, not squared), the unit of every radius in
``index``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def pairwise_sq(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> Any:
    """(len(a), len(b)) squared L2 distances in float64, clipped at 0."""
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def calibrate_radius(
    keys: npt.ArrayLike,
    *,
    groups: npt.ArrayLike | None = None,
    quantile: float = 0.5,
    fraction: float = 0.5,
) -> float:
    """A radius for ``keys`` of one model and layer, by the rule below (pure function).

    For every key, take the L2 distance to the nearest key of a *different* group
    (``groups`` labels keys of the same fact, e.g. a prompt and its rephrasings;
    without it every key is its own group). The radius is ``fraction`` times the
    ``quantile`` of those distances. With ``fraction = 0.5`` two distinct facts at
    the typical nearest distance get balls that touch but do not overlap; rephrases
    closer than that to their fact's key still fall inside.
    """
    x = np.asarray(keys, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"calibrate_radius needs (N >= 2, d) keys, got shape {x.shape}")
    labels = np.arange(len(x)) if groups is None else np.asarray(groups)
    if labels.shape != (len(x),):
        raise ValueError(f"groups has {labels.shape} labels for {len(x)} keys")
    if len(np.unique(labels)) < 2:
        raise ValueError("calibrate_radius needs keys of at least two distinct groups")
    if not (0.0 <= quantile <= 1.0 and fraction > 0.0):
        raise ValueError(f"need 0 <= quantile <= 1 and fraction > 0, got {quantile}, {fraction}")
    nearest = np.empty(len(x))
    for start in range(0, len(x), 1024):  # (chunk, N) distance rows at a time
        rows = slice(start, start + 1024)
        sq = pairwise_sq(x[rows], x)
        sq[labels[rows, None] == labels[None, :]] = np.inf
        nearest[rows] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    return float(fraction * np.quantile(nearest, quantile))
