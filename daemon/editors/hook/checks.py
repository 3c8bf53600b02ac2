"""The hook editor's two refusals after a solve: the gate recall check and the collapse guard.

Both raise :class:`SolveError`; the editor then rolls the batch back and refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from daemon.editors.base import EditSpec
from daemon.editors.hook import math as hmath
from daemon.editors.hook.keys import KeySites
from daemon.editors.hook.layer import HookedProjection
from daemon.errors import SolveError


def check_recall(
    model: PreTrainedModel,
    hooks: Mapping[int, HookedProjection],
    batch: Sequence[EditSpec],
    enc: KeySites,
    shard: int,
) -> None:
    """Raise SolveError unless the gate routes every key site of the batch to ``shard``."""
    model(**enc.forward_inputs(), use_cache=False)
    for layer, hook in hooks.items():
        route = hook.last_route
        got = route[enc.rows, enc.positions] if route is not None else torch.full_like(enc.rows, -1)
        missed = sorted({batch[int(e)].edit_id for e in enc.owner[got != shard].tolist()})
        if missed:
            raise SolveError(
                f"layer {layer}: the scope gate does not route {len(missed)} edit(s) of "
                f"the batch to their shard {shard} (gate recall check): {missed[:5]}",
                layer=layer,
                edit_ids=missed,
            )


def guard_update(layer: int, update: float, history: list[float], max_zscore: float) -> None:
    """Refuse an update norm (``||update|| / ||W0||``) that is an outlier against this
    layer's ``history``; otherwise append it to the history."""
    if hmath.is_outlier(update, history, max_zscore):
        raise SolveError(
            f"layer {layer}: the batch's update norm {update:.4g} x ||W0|| is an outlier "
            f"against the last {len(history)} batches (collapse guard)",
            layer=layer,
            update_norm_ratio=update,
        )
    history.append(update)
