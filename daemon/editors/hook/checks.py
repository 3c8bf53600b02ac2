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


GUARD_MIN_HISTORY = 20
"""Batches a layer must have taken before the collapse guard judges one.

With 5 (the former value) the guard refused ordinary batches early in a stream: on
the medium GPT-2 world 4 of the first 12 batches were outliers only against a tight
history of 7-10 (edits 71-90 and 111-120; efficacy 0.80 at 100 edits). With 20 the
same stream takes them all (efficacy 1.00, locality 1.00 at 300 edits), and the later
real jumps (2.8-4.7 x ||W0|| against hundreds of batches) are still refused."""


def guard_update(layer: int, update: float, history: list[float], max_zscore: float) -> None:
    """Refuse an update norm (``||update|| / ||W0||``) that is an outlier against this
    layer's ``history`` (once it holds ``GUARD_MIN_HISTORY`` batches; a non-finite
    norm always); otherwise append it to the history."""
    if hmath.is_outlier(update, history, max_zscore, min_history=GUARD_MIN_HISTORY):
        raise SolveError(
            f"layer {layer}: the batch's update norm {update:.4g} x ||W0|| is an outlier "
            f"against the last {len(history)} batches (collapse guard)",
            layer=layer,
            update_norm_ratio=update,
        )
    history.append(update)
