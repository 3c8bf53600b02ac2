"""Hook layers: gated fp32 deltas beside an MLP output projection whose weight stays intact.

``HookedProjection`` replaces a model's MLP output projection (``nn.Linear`` or
transformers' ``Conv1D``, told apart by ``daemon.model.arch``) with a wrapper that
computes, per token::

    y = base(x) + [gate(x) = s] * (x.float() @ delta[s].T)      (or keys[j] @ delta[s].T)

in float32 and casts back to the base output's dtype. Where the architecture puts a
norm between the projection and the residual stream (Gemma 2/3), ``defer_past`` moves
the added term behind that norm: the norm sees ``base(x)`` and the edit is added to
its output, so what the editor solves for is what reaches the residual.

The base module and its weight ``W0`` are never touched, so a bf16/fp16 model keeps
``W0`` in its dtype while the edits accumulate in fp32 deltas. Where the gate is
closed for a token the output is the base output bit for bit.

The class is assembled from three modules, one job each:
:mod:`daemon.editors.hook.layer_shards` keeps the shard deltas and their edits
(``set_delta``, ``add_shard``, ...), :mod:`daemon.editors.hook.layer_routing`
decides which shard each token gets (the scope gate, ``gate_mode``,
``last_route``), and this module holds :class:`HookedProjection` itself: its
buffers, the stored keys and their calibration, the forward pass, its
``state_dict`` and its snapshots.

Stored keys
-----------
The hook stores the keys of its edits, ``keys`` ``(m, d_in)`` fp32 (one row per key
site; rows can be removed for retraction), each with its shard (``key_shard``) and
its own reference (``key_mean``, ``key_std``) over the calibration tokens, all
persisted; :mod:`daemon.editors.hook.layer_routing` describes how they route.

``calibrate_gates`` (:mod:`daemon.editors.hook.wiring`) reads the calibration
tokens' keys once (pads excluded, deltas closed, so they are the base model's),
sets ``center``, caches up to ``MAX_CALIBRATION_TOKENS`` of them (not persisted)
and computes every key's reference; ``add_keys`` computes the references of new
keys from that cache. A key without a reference (NaN: added before any
calibration) never fires, so an uncalibrated hook behaves as the base model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from torch import nn

from daemon.editors.hook import deltas as shard_deltas
from daemon.editors.hook.deltas import ShardDelta
from daemon.editors.hook.gate import (
    DEFAULT_COS_FLOOR,
    DEFAULT_SUBJECT_COS_FLOOR,
    DEFAULT_THRESHOLD,
    DEFAULT_THRESHOLD_FLOOR,
    CandidateTable,
    GateCache,
    Scope,
    SubjectScope,
    add_values,
    key_reference,
    route_table,
)
from daemon.editors.hook.layer_routing import GateMode, GateRoutingMixin, RouteParts
from daemon.editors.hook.layer_shards import ShardDeltasMixin
from daemon.model import arch

__all__ = [
    "DEFAULT_COS_FLOOR",
    "DEFAULT_SUBJECT_COS_FLOOR",
    "DEFAULT_THRESHOLD",
    "DEFAULT_THRESHOLD_FLOOR",
    "GateMode",
    "HookedProjection",
    "key_reference",
]

log = structlog.get_logger()

MAX_CALIBRATION_TOKENS = 8192


def calibration_sample(n_tokens: int) -> list[int]:
    """Which of ``n_tokens`` calibration keys the token cache keeps: evenly spaced,
    at most ``MAX_CALIBRATION_TOKENS`` (all of them below that)."""
    if n_tokens <= MAX_CALIBRATION_TOKENS:
        return list(range(n_tokens))
    step = n_tokens / MAX_CALIBRATION_TOKENS
    return [int(i * step) for i in range(MAX_CALIBRATION_TOKENS)]


"""At most this many calibration tokens (spread evenly) are cached per hook."""

_KEY_CHUNK = 4096


@dataclass(frozen=True)
class HookSnapshot:
    """What ``HookedProjection.snapshot`` keeps: the replaced objects themselves."""

    deltas: list[ShardDelta]
    keys: torch.Tensor
    key_shard: torch.Tensor
    key_mean: torch.Tensor
    key_std: torch.Tensor


class HookedProjection(ShardDeltasMixin, GateRoutingMixin, nn.Module):
    """An MLP output projection plus gated fp32 deltas; ``base`` is the original module."""

    keys: torch.Tensor
    key_shard: torch.Tensor
    key_mean: torch.Tensor
    key_std: torch.Tensor
    center: torch.Tensor
    threshold: torch.Tensor
    threshold_floor: torch.Tensor
    cos_floor: torch.Tensor
    subject_cos_floor: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        threshold_floor: float = DEFAULT_THRESHOLD_FLOOR,
        cos_floor: float = DEFAULT_COS_FLOOR,
        subject_cos_floor: float = DEFAULT_SUBJECT_COS_FLOOR,
    ) -> None:
        super().__init__()
        self.base = base
        d_in, d_out = arch.projection_in_out(base)
        device = arch.projection_weight_out_in(base).device
        self.d_in = d_in
        self.d_out = d_out
        f32 = torch.float32
        self._device = device
        self.deltas: list[ShardDelta] = [ShardDelta.zero(d_out, d_in, device)]
        self._delta_version = 0  # bumped on every change of ``deltas`` (gate tables)
        self.register_buffer("keys", torch.zeros(0, d_in, dtype=f32, device=device))
        self.register_buffer("key_shard", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("key_mean", torch.zeros(0, dtype=f32, device=device))
        self.register_buffer("key_std", torch.zeros(0, dtype=f32, device=device))
        self.register_buffer("center", torch.zeros(d_in, dtype=f32, device=device))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=f32, device=device))
        self.register_buffer(
            "threshold_floor", torch.tensor(threshold_floor, dtype=f32, device=device)
        )
        self.register_buffer("cos_floor", torch.tensor(cos_floor, dtype=f32, device=device))
        # the subject gate's floor: persisted, so a loaded state keeps the floor it was
        # solved and checked with (also where ``"auto"`` calibrated another one)
        self.register_buffer(
            "subject_cos_floor", torch.tensor(subject_cos_floor, dtype=f32, device=device)
        )
        self.gate_mode: GateMode = "auto"
        self.position_mask: torch.Tensor | None = None  # [B, T] bool, for gate_mode "mask"
        self.mask_shard = 0  # the shard applied by gate modes "mask" and "open"
        self._last_route: torch.Tensor | None = None
        self._pending_route: tuple[tuple[int, ...], RouteParts | None] | None = None
        # the subject gate (None: the pure-key gate); set from settings, never persisted
        self.scope: SubjectScope | None = None
        self.snap_keys = False  # subject gate: apply the matched key's value, not x's
        self.share_route = False  # subject gate: reuse the first hook layer's decision
        self._tables: tuple[torch.Tensor, tuple[Any, ...], CandidateTable | None] | None = None
        self._per_key: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None] | None = None
        self._has_delta = False
        # calibration (set by calibrate_gates, never persisted)
        self._collect: list[torch.Tensor] | None = None
        self._token_mask: torch.Tensor | None = None
        self._calib_tokens: torch.Tensor | None = None
        self._gate_cache: GateCache | None = None
        # a norm between this projection and the residual (``defer_past``): the edit
        # computed in ``forward`` waits in ``_addend`` for that norm's forward hook
        self._norm_handle: torch.utils.hooks.RemovableHandle | None = None
        self._addend: torch.Tensor | None = None

    # --- stored keys ---------------------------------------------------------------------

    @torch.no_grad()
    def add_keys(self, keys_in_n: torch.Tensor, shard: int = 0) -> None:
        """Store edit keys given as columns ``(d_in, n)`` (MEMIT's layout) for ``shard``.

        Their references come from the cached calibration tokens; without a cache
        they are NaN and the keys never fire until ``calibrate_gates`` runs.
        """
        if keys_in_n.dim() != 2 or keys_in_n.shape[0] != self.d_in:
            raise ValueError(f"keys must be (d_in={self.d_in}, n); got {tuple(keys_in_n.shape)}")
        s = self._shard_index(shard)
        new = keys_in_n.detach().T.to(device=self.keys.device, dtype=torch.float32)
        if self._calib_tokens is not None:
            mean, std = key_reference(self._calib_tokens, new, self.center)
        else:
            mean = torch.full((new.shape[0],), float("nan"), device=new.device)
            std = mean.clone()
        self.keys = torch.cat([self.keys, new], dim=0)
        self.key_shard = torch.cat([self.key_shard, self.key_shard.new_full((new.shape[0],), s)])
        self.key_mean = torch.cat([self.key_mean, mean.to(self.key_mean.device)])
        self.key_std = torch.cat([self.key_std, std.to(self.key_std.device)])

    @torch.no_grad()
    def remove_keys(self, indices: Sequence[int]) -> None:
        """Drop stored keys (and their references) by row index."""
        drop = set(indices)
        keep = [j for j in range(self.keys.shape[0]) if j not in drop]
        self.keys = self.keys[keep].clone()
        self.key_shard = self.key_shard[keep].clone()
        self.key_mean = self.key_mean[keep].clone()
        self.key_std = self.key_std[keep].clone()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all edits: one zero shard, no keys (gate closed). The centre is kept."""
        self._set_deltas([ShardDelta.zero(self.d_out, self.d_in, self._device)])
        self.remove_keys(range(self.keys.shape[0]))

    @torch.no_grad()
    def set_threshold(self, z: float) -> float:
        """Set the z threshold (clamped at the floor); returns the effective value."""
        effective = max(float(z), float(self.threshold_floor))
        self.threshold.fill_(effective)
        return effective

    @property
    def subject_floor(self) -> float:
        """The subject gate's floor as a number (its float32 buffer, to 6 decimals)."""
        return round(float(self.subject_cos_floor), 6)

    # --- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._collect is not None:
            self._observe(x)
        out: torch.Tensor = self.base(x)
        edited = self._edit(x, out)
        if self._norm_handle is None:
            return edited
        # a norm follows: it gets the base output, and the edit is added after it
        self._addend = None if edited is out else edited.float() - out.float()
        return out

    def defer_past(self, norm: nn.Module) -> None:
        """Add this hook's edit after ``norm`` (the module its output goes through
        before the residual stream), not to the projection's output, so the edit reaches
        the residual as solved. ``undefer`` puts it back."""
        if self._norm_handle is not None:
            raise ValueError("this hook already adds its edit after a norm")
        self._norm_handle = norm.register_forward_hook(self._add_after_norm)

    def undefer(self) -> None:
        """Stop adding the edit after a norm (``defer_past``); a no-op when not deferred."""
        if self._norm_handle is not None:
            self._norm_handle.remove()
            self._norm_handle = None
        self._addend = None

    def _add_after_norm(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        addend, self._addend = self._addend, None
        if addend is None:
            return None
        if not isinstance(output, torch.Tensor) or output.shape != addend.shape:
            raise RuntimeError(
                f"the norm after a hooked projection gave {type(output).__name__} "
                f"{getattr(output, 'shape', None)}, not the projection's shape "
                f"{tuple(addend.shape)}"
            )
        return (output.float() + addend).to(output.dtype)

    def _edit(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output for ``x``) with the routed deltas added (or ``out``
        itself where no token is routed)."""
        if not self._has_delta or self.gate_mode == "closed":
            self.last_route = None
            return out
        scope = self._subject_scope(x)
        if scope is not None:
            return self._forward_subject(x, out, scope)
        route = self.route(x)
        self.last_route = route
        return self._apply_deltas(x, out, route)

    def _forward_subject(self, x: torch.Tensor, out: torch.Tensor, scope: Scope) -> torch.Tensor:
        table = self._table(scope)
        if table is None:
            self._pending_route = (tuple(x.shape[:-1]), None)
            return out
        shared = self.scope.shared_decision() if self.share_route and self.scope else None
        if shared is not None:
            fire, winner = shared
        else:
            fire, winner = route_table(x, self.center, table, scope.causal(x.shape[1]))
            if self.share_route and self.scope is not None:
                self.scope.share_decision((fire, winner))
        self._pending_route = (tuple(x.shape[:-1]), (table, fire, winner))
        if table.values is not None:
            return add_values(out, table, fire, winner)
        route = self.last_route
        assert route is not None
        return self._apply_deltas(x, out, route)

    def _apply_deltas(
        self, x: torch.Tensor, out: torch.Tensor, route: torch.Tensor
    ) -> torch.Tensor:
        """``out`` plus each routed token's ``x @ delta[shard].T`` (fp32, cast back)."""
        flat_route = route.reshape(-1)
        rows = (flat_route >= 0).nonzero().squeeze(1)  # (R,)
        if rows.numel() == 0:
            return out
        shards, order = flat_route.index_select(0, rows).sort(stable=True)
        rows = rows.index_select(0, order)  # grouped by shard, token order within a shard
        xf = x.reshape(-1, self.d_in).index_select(0, rows).float()  # (R, d_in)
        counts = torch.bincount(shards, minlength=self.n_shards).tolist()
        parts, start = [], 0
        for s, count in enumerate(counts):
            if count:
                parts.append(self.deltas[s].apply(xf[start : start + count]))  # (count, d_out)
                start += count
        update = parts[0] if len(parts) == 1 else torch.cat(parts)
        flat_out = out.reshape(-1, self.d_out)
        new = (flat_out.index_select(0, rows).float() + update).to(out.dtype)
        return flat_out.index_copy(0, rows, new).reshape(out.shape)

    # --- calibration ---------------------------------------------------------------------

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Collect calibration keys over the non-pad tokens of ``x``."""
        flat = x.detach().float().reshape(-1, x.shape[-1])
        if self._token_mask is not None:
            flat = flat[self._token_mask.reshape(-1).to(flat.device)]
        assert self._collect is not None
        self._collect.append(flat)

    @torch.no_grad()
    def set_calibration(self, tokens: torch.Tensor, center: torch.Tensor | None = None) -> None:
        """Set the centre and token cache from calibration keys ``(N, d_in)``; re-reference keys.

        ``center`` (the mean of every calibration key, when ``tokens`` is a sample of
        them: :func:`calibration_sample`) defaults to the mean of ``tokens``.
        """
        if tokens.shape[0] == 0:
            raise ValueError("calibration needs at least one token")
        self.center.copy_(tokens.double().mean(dim=0).float() if center is None else center)
        if tokens.shape[0] > MAX_CALIBRATION_TOKENS:
            tokens = tokens[calibration_sample(tokens.shape[0])]
        self._calib_tokens = tokens.float().clone()
        means, stds = [], []
        for start in range(0, self.keys.shape[0], _KEY_CHUNK):
            m, s = key_reference(tokens, self.keys[start : start + _KEY_CHUNK], self.center)
            means.append(m)
            stds.append(s)
        if means:
            self.key_mean = torch.cat(means).to(self.key_mean.device)
            self.key_std = torch.cat(stds).to(self.key_std.device)

    # --- state dict ----------------------------------------------------------------------

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in shard_deltas.state_entries(self.deltas).items():
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        ours = {
            k[len(prefix) :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix)
            and k[len(prefix) :].split(".", 1)[0] in shard_deltas.ENTRY_NAMES
        }
        try:
            loaded = shard_deltas.from_entries(ours, self._device)
        except ValueError as exc:
            error_msgs.append(f"{prefix}delta: {exc}")
            loaded = None
        if loaded is not None:
            self._set_deltas(loaded)
        elif strict:
            missing_keys.append(prefix + shard_deltas.DENSE)
        for name in ("keys", "key_shard", "key_mean", "key_std"):  # they grow
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.dim() == current.dim():
                setattr(self, name, current.new_zeros(tuple(incoming.shape)))
        rest = {
            k: v
            for k, v in state_dict.items()
            if not (k.startswith(prefix) and k[len(prefix) :] in ours)
        }
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- transactions --------------------------------------------------------------------

    def snapshot(self) -> HookSnapshot:
        """References to everything an edit batch replaces (no tensor is copied: the
        hook replaces its deltas and key tensors, it never writes into them)."""
        return HookSnapshot(self.deltas, self.keys, self.key_shard, self.key_mean, self.key_std)

    def restore(self, snap: HookSnapshot) -> None:
        """Return to ``snap`` (taken by ``snapshot``)."""
        self._set_deltas(snap.deltas)
        self.keys, self.key_shard = snap.keys, snap.key_shard
        self.key_mean, self.key_std = snap.key_mean, snap.key_std

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, keys={self.keys.shape[0]}, "
            f"shards={self.n_shards}"
        )
