"""Installing hook layers on a model, and the two ways the editor drives their gates.

``install_hooks``/``remove_hooks`` swap each hook layer's MLP output projection for a
:class:`~daemon.editors.hook.layer.HookedProjection` and back (where a norm follows
the projection, the hook adds its edit after that norm); ``gate_positions``
applies one shard exactly at given token positions (how the editor reads keys and
residuals while it solves); ``calibrate_gates`` reads the calibration text's keys
and references every stored key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import structlog
import torch
from torch import nn

from daemon.editors.hook.gate import (
    DEFAULT_COS_FLOOR,
    DEFAULT_SUBJECT_COS_FLOOR,
    DEFAULT_THRESHOLD,
    DEFAULT_THRESHOLD_FLOOR,
)
from daemon.editors.hook.layer import HookedProjection, calibration_sample
from daemon.model import arch
from daemon.model.batches import padded_forward_inputs
from daemon.model.partial import forward_until

log = structlog.get_logger()


def _parent_and_name(model: nn.Module, layer: int) -> tuple[nn.Module, str]:
    path = arch.module_path(model, "mlp_out", layer)
    parent_path, _, name = path.rpartition(".")
    parent = arch.get_module(model, parent_path) if parent_path else model
    return parent, name


def install_hooks(
    model: nn.Module,
    layers: Sequence[int],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_floor: float = DEFAULT_THRESHOLD_FLOOR,
    cos_floor: float = DEFAULT_COS_FLOOR,
    subject_cos_floor: float = DEFAULT_SUBJECT_COS_FLOOR,
) -> dict[int, HookedProjection]:
    """Wrap the MLP output projection of each of ``layers`` in a ``HookedProjection``."""
    hooks: dict[int, HookedProjection] = {}
    for i in layers:
        parent, name = _parent_and_name(model, i)
        current = getattr(parent, name)
        if isinstance(current, HookedProjection):
            raise ValueError(f"layer {i} already carries a hook")
        hook = HookedProjection(
            current,
            threshold=threshold,
            threshold_floor=threshold_floor,
            cos_floor=cos_floor,
            subject_cos_floor=subject_cos_floor,
        )
        setattr(parent, name, hook)
        norm = arch.post_mlp_norm_module(model, i)
        if norm is not None:
            hook.defer_past(norm)
        hooks[i] = hook
    log.debug("hooks_installed", layers=list(hooks))
    return hooks


def remove_hooks(model: nn.Module, hooks: Mapping[int, HookedProjection]) -> None:
    """Put the original projection modules back (the very same objects)."""
    for i, hook in hooks.items():
        parent, name = _parent_and_name(model, i)
        if getattr(parent, name) is not hook:
            raise ValueError(f"layer {i} does not carry the given hook")
        hook.undefer()
        setattr(parent, name, hook.base)
    log.debug("hooks_removed", layers=list(hooks))


@contextmanager
def gate_positions(
    hooks: Mapping[int, HookedProjection],
    mask: torch.Tensor | None,
    shard: int | None = None,
) -> Iterator[None]:
    """Apply one shard's delta exactly where ``mask`` ``[B, T]`` is True (None: nowhere).

    ``shard`` defaults to each hook's last (open) shard. Restores each hook's
    previous gate mode on exit. The editor uses this while it solves so that keys
    and residuals see the batch's shard at the edits' key positions only, as the
    gate routes those prompts at inference.
    """
    saved = {i: (h.gate_mode, h.position_mask, h.mask_shard) for i, h in hooks.items()}
    for h in hooks.values():
        h.gate_mode = "closed" if mask is None else "mask"
        h.position_mask = None if mask is None else mask.bool()
        h.mask_shard = h.n_shards - 1 if shard is None else shard
    try:
        yield
    finally:
        for i, h in hooks.items():
            h.gate_mode, h.position_mask, h.mask_shard = saved[i]


@torch.no_grad()
def calibrate_gates(
    model: nn.Module,
    hooks: Mapping[int, HookedProjection],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 32,
) -> None:
    """Read the calibration tokens' keys (pads excluded, deltas off) and reference every key.

    One pass over the batch: sets each hook's ``center`` (the mean of every key),
    caches its sample of calibration tokens (``calibration_sample``, taken batch by
    batch so that no more than one batch of keys is held beyond it) and recomputes
    every stored key's reference (``set_calibration``).
    """
    modes = {i: h.gate_mode for i, h in hooks.items()}
    keep = torch.tensor(calibration_sample(int(attention_mask.sum())), dtype=torch.long)
    sums = {i: torch.zeros(h.d_in, dtype=torch.float64) for i, h in hooks.items()}
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in hooks}
    seen = 0
    for h in hooks.values():
        h.gate_mode = "closed"
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            for h in hooks.values():
                h._token_mask = mask.bool()
                h._collect = []
            inputs = padded_forward_inputs(ids, mask)
            forward_until(model, hooks[max(hooks)], **inputs, use_cache=False)  # none above
            n = int(mask.sum())
            mine = keep[(keep >= seen) & (keep < seen + n)] - seen
            for i, h in hooks.items():
                assert h._collect is not None
                keys = torch.cat(h._collect)  # (n, d_in)
                sums[i] += keys.double().sum(dim=0).cpu()
                kept[i].append(keys[mine.to(keys.device)])
            seen += n
        for i, h in hooks.items():
            center = (sums[i] / max(seen, 1)).float()
            h.set_calibration(torch.cat(kept[i]), center=center.to(h.center.device))
    finally:
        for i, h in hooks.items():
            h.gate_mode = modes[i]
            h._collect = None
            h._token_mask = None
    log.debug("gates_calibrated", tokens=int(attention_mask.sum()), hooks=list(hooks))
