"""Hook layers: gated fp32 deltas beside an MLP output projection whose weight stays
intact, and how the editor installs and drives them on a model.

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

Shards
------
``deltas`` holds one :class:`~daemon.editors.hook.deltas.ShardDelta` per shard
(``d_out x d_in``, dense or as two low-rank factors; immutable, replaced on every
change): the editor fills one shard with a bounded number of edit keys (a linear map
from ``d_in`` cannot hold many more facts than ``d_in`` keys) and then opens the
next. Every stored key carries its shard (``key_shard``); a token that the gate lets
through gets the delta of the shard of its nearest eligible key, so each shard is a
closed-form solve over its own keys. The layer's ``state_dict`` persists the shards
(:func:`daemon.editors.hook.deltas.state_entries`).

Stored keys
-----------
The hook stores the keys of its edits, ``keys`` ``(m, d_in)`` fp32 (one row per key
site; rows can be removed for retraction), each with its shard (``key_shard``) and
its own reference (``key_mean``, ``key_std``) over the calibration tokens, all
persisted.

``calibrate_gates`` reads the calibration tokens' keys once (pads excluded, deltas
closed, so they are the base model's), sets ``center``, caches up to
``MAX_CALIBRATION_TOKENS`` of them (not persisted) and computes every key's
reference; ``add_keys`` computes the references of new keys from that cache. A key
without a reference (NaN: added before any calibration) never fires, so an
uncalibrated hook behaves as the base model.

Routing
-------
A token is routed to the shard of the nearest eligible stored key. The rules live in
:mod:`daemon.editors.hook.gate`; this layer holds their state and applies them. Two
gates:

- **subject** (``scope`` set: a :class:`~daemon.editors.hook.gate.SubjectScope` the
  editor attaches): a token is scored only against the keys of the edits whose
  subject its sequence names up to it (cosine floor ``subject_cos_floor``, a
  persisted buffer that ``gate_subject_cos_floor = "auto"`` calibrates). The
  candidates are decided at the prefill and kept for the KV-cached decode steps.
  With ``snap_keys`` a routed token gets the value of the key it matched,
  ``keys[j] @ delta[s].T``, instead of ``x @ delta[s].T``: a rephrasing whose key
  is merely near the edit's then receives the edit's whole residual. With
  ``share_route`` the first hook layer of a forward decides for the layers above it
  (the key rows are the same in every hook), which halves the gate's cost.
- **key** (no scope, or no scope for this forward, e.g. ``inputs_embeds``): every
  token against every key, decided per token from its own key, so a one-token
  decode step is scored like the same position of a full forward pass.

A limit of the key gate: at hook layer 0 the input at the prompt's last token
carries almost no subject information, so same-template prompts about other
subjects pass it; deeper hook layers separate far better and the editor's locate
step should prefer them.

``gate_mode`` (``"auto"``, ``"open"``, ``"closed"``) forces the gate for tests and
diagnostics (``"open"`` applies the shard ``mask_shard``); ``"mask"`` (entered
through :func:`gate_positions`) applies shard ``mask_shard``'s delta exactly at
given token positions, which is how the editor computes keys and residuals while it
solves. ``last_route`` holds the shard per token of the latest forward (-1: closed)
and ``last_gate`` its boolean form (neither persisted).

On the model
------------
``install_hooks``/``remove_hooks`` swap each hook layer's MLP output projection for a
``HookedProjection`` and back (where a norm follows the projection, the hook adds its
edit after that norm); ``gate_positions`` applies one shard exactly at given token
positions; ``calibrate_gates`` reads the calibration text's keys and references
every stored key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

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
    candidate_table,
    key_reach,
    key_reference,
    route_table,
    route_tokens,
    routes_of,
    tensor_stamp,
)
from daemon.model import arch
from daemon.model.batches import padded_forward_inputs
from daemon.model.partial import forward_until

log = structlog.get_logger()

MAX_CALIBRATION_TOKENS = 8192
"""At most this many calibration tokens (spread evenly) are cached per hook."""

_KEY_CHUNK = 4096

GateMode = Literal["auto", "open", "closed", "mask"]

RouteParts = tuple[CandidateTable, torch.Tensor, torch.Tensor]  # table, fire, winner


def calibration_sample(n_tokens: int) -> list[int]:
    """Which of ``n_tokens`` calibration keys the token cache keeps: evenly spaced,
    at most ``MAX_CALIBRATION_TOKENS`` (all of them below that)."""
    if n_tokens <= MAX_CALIBRATION_TOKENS:
        return list(range(n_tokens))
    step = n_tokens / MAX_CALIBRATION_TOKENS
    return [int(i * step) for i in range(MAX_CALIBRATION_TOKENS)]


@dataclass(frozen=True)
class HookSnapshot:
    """What ``HookedProjection.snapshot`` keeps: the replaced objects themselves."""

    deltas: list[ShardDelta]
    keys: torch.Tensor
    key_shard: torch.Tensor
    key_mean: torch.Tensor
    key_std: torch.Tensor


class HookedProjection(nn.Module):
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

    # --- shard deltas --------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        return len(self.deltas)

    @property
    def delta(self) -> torch.Tensor:
        """Every shard's delta, dense ``(n_shards, d_out, d_in)`` fp32 (materialised:
        for tests and diagnostics, never on the forward path)."""
        return torch.stack([d.to_dense() for d in self.deltas])

    def shard_output(self, x: torch.Tensor, shard: int) -> torch.Tensor:
        """``x @ delta[shard].T`` for rows ``x`` ``(n, d_in)``, in ``x``'s dtype."""
        return self.deltas[self._shard_index(shard)].apply(x.to(self._device))

    def _as_delta(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        if tuple(delta_out_in.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"delta shape {tuple(delta_out_in.shape)} does not match the projection's "
                f"[out, in] = [{self.d_out}, {self.d_in}]"
            )
        if not bool(torch.isfinite(delta_out_in).all()):
            raise ValueError("delta holds non-finite values (NaN/inf)")
        return delta_out_in.detach().to(device=self._device, dtype=torch.float32)

    def _shard_index(self, shard: int) -> int:
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} outside 0..{self.n_shards - 1}")
        return shard

    def _set_deltas(self, deltas: list[ShardDelta]) -> None:
        """Replace the shard list (never written into: a rollback may hold the old one)."""
        self.deltas = deltas
        self._delta_version += 1
        self._has_delta = any(d.nonzero() for d in deltas)

    def _replace(self, shard: int, delta: ShardDelta) -> None:
        s = self._shard_index(shard)
        self._set_deltas([*self.deltas[:s], delta, *self.deltas[s + 1 :]])

    @torch.no_grad()
    def add_shard(self) -> int:
        """Open a new, empty shard; returns its index."""
        zero = ShardDelta.zero(self.d_out, self.d_in, self._device)
        self._set_deltas([*self.deltas, zero])
        return self.n_shards - 1

    @torch.no_grad()
    def set_delta(self, delta_out_in: torch.Tensor, shard: int = 0) -> None:
        """Replace one shard's delta (``[out, in]``, any float dtype; stored fp32)."""
        self._replace(shard, ShardDelta(dense=self._as_delta(delta_out_in)))

    @torch.no_grad()
    def set_factors(self, up: torch.Tensor, down: torch.Tensor, shard: int = 0) -> None:
        """Replace one shard's delta by ``up @ down``: ``(d_out, r)`` and ``(r, d_in)``
        (any float dtype; stored fp32)."""
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not multiply")
        if up.shape[0] != self.d_out or down.shape[1] != self.d_in:
            raise ValueError(
                f"factors give [{up.shape[0]}, {down.shape[1]}], not the projection's "
                f"[out, in] = [{self.d_out}, {self.d_in}]"
            )
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise ValueError("delta factors hold non-finite values (NaN/inf)")
        f32 = torch.float32
        self._replace(
            shard,
            ShardDelta(
                up=up.detach().to(self._device, f32), down=down.detach().to(self._device, f32)
            ),
        )

    @torch.no_grad()
    def add_delta(self, delta_out_in: torch.Tensor, shard: int = 0) -> None:
        """Add an ``[out, in]`` update to one shard's delta (summed in float64, stored fp32)."""
        s = self._shard_index(shard)
        add = delta_out_in.detach().to(device=self._device, dtype=torch.float64)
        self.set_delta(self.deltas[s].to_dense(torch.float64) + add, s)

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

    # --- routing -------------------------------------------------------------------------

    def _cache(self) -> GateCache:
        """The gate's derived tensors, rebuilt when a key, reference or threshold changed."""
        limits = (self.threshold, self.threshold_floor, self.cos_floor)
        sources = (self.keys, self.center, self.key_mean, self.key_std, *limits)
        stamp = tuple(tensor_stamp(t) for t in sources)  # no .item() per forward
        cache = self._gate_cache
        if cache is None or cache.stamp != stamp:
            with torch.no_grad():
                cache = self._gate_cache = GateCache(
                    stamp,
                    self.keys,
                    self.center,
                    self.key_mean,
                    self.key_std,
                    max(float(self.threshold), float(self.threshold_floor)),
                    float(self.cos_floor),
                )
                cache.sources = sources  # kept alive: ids stay unique
        return cache

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Centred unit token keys ``(N, d_in)`` float32 from ``x`` ``(..., d_in)``."""
        return nn.functional.normalize(x.reshape(-1, self.d_in).float() - self.center, dim=-1)

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        """Centred cosine of each token's key to every stored key: ``x.shape[:-1] + (m,)``."""
        cos = self._normalised(x) @ self._cache().keys_n.T
        return cos.reshape(*x.shape[:-1], self.keys.shape[0])

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Max centred cosine to the stored keys, shape ``x.shape[:-1]`` (-inf: no keys)."""
        if self.keys.shape[0] == 0:
            return torch.full(x.shape[:-1], float("-inf"), device=x.device)
        return self.cosines(x).amax(dim=-1)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Shard per token (``x.shape[:-1]``, long), -1 where the gate is closed."""
        closed = torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)
        if self.gate_mode == "open":
            return closed + 1 + self.mask_shard
        if self.gate_mode == "mask":
            if self.position_mask is None or tuple(self.position_mask.shape) != tuple(x.shape[:-1]):
                shape = None if self.position_mask is None else tuple(self.position_mask.shape)
                raise ValueError(f"gate position mask {shape} does not fit input {tuple(x.shape)}")
            return torch.where(self.position_mask.to(x.device), self.mask_shard, closed)
        if self.gate_mode == "closed" or self.keys.shape[0] == 0:
            return closed
        scope = self._subject_scope(x)
        if scope is not None:
            table = self._table(scope)
            if table is None:
                return closed
            fire, winner = route_table(x, self.center, table, scope.causal(x.shape[1]))
            return routes_of(table, fire, winner)
        cache = self._cache()
        if not cache.any_reachable:
            return closed
        shards = route_tokens(
            self._normalised(x), cache, self.key_mean, self.key_std, self.key_shard
        )
        return shards.reshape(closed.shape)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean gate per token, shape ``x.shape[:-1]``."""
        return self.route(x) >= 0

    # --- the subject gate ----------------------------------------------------------------

    def _subject_scope(self, x: torch.Tensor) -> Scope | None:
        """The subject scope of this forward, when the subject gate decides it."""
        if self.scope is None or self.gate_mode != "auto" or self.keys.shape[0] == 0:
            return None
        scope = self.scope.current()
        return scope if scope is not None and scope.fits(x.shape[:-1]) else None

    def _table(self, scope: Scope) -> CandidateTable | None:
        """This layer's candidate table of ``scope``; its decode steps reuse the table of
        its prefill (the editor changes no key while a request runs)."""
        held = self._tables
        if not scope.prefill and held is not None and held[0] is scope.candidates:
            return held[2]
        cache = self._cache()
        floor_stamp = tensor_stamp(self.subject_cos_floor)  # in place: fill_, load_state_dict
        stamp = (cache.stamp, self._delta_version, floor_stamp, self.snap_keys)
        if held is not None and held[0] is scope.candidates and held[1] == stamp:
            return held[2]
        with torch.no_grad():
            if self._per_key is None or self._per_key[0] != stamp:
                floor = float(self.subject_cos_floor)
                reach = key_reach(self.key_mean, self.key_std, cache.limit, floor)
                snapped = shard_deltas.key_values(self.keys, self.key_shard, self.deltas)
                self._per_key = (stamp, reach, snapped if self.snap_keys else None)
            _, fire_at, values = self._per_key
            table = candidate_table(scope.candidates, cache.keys_n, fire_at, self.key_shard, values)
        self._tables = (scope.candidates, stamp, table)
        return table

    # --- the latest forward's route ------------------------------------------------------

    @property
    def last_gate(self) -> torch.Tensor | None:
        """Boolean gate per token of the latest forward (None when no delta applied)."""
        return None if self.last_route is None else self.last_route >= 0

    @property
    def last_route(self) -> torch.Tensor | None:
        """Shard per token of the latest forward (-1: closed; None: no delta applied)."""
        if self._pending_route is not None:  # the subject gate builds it only when asked
            shape, parts = self._pending_route
            self._pending_route = None
            closed = torch.full(shape, -1, dtype=torch.long, device=self.keys.device)
            self._last_route = closed if parts is None else routes_of(*parts)
        return self._last_route

    @last_route.setter
    def last_route(self, route: torch.Tensor | None) -> None:
        self._pending_route = None
        self._last_route = route

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


# --- on the model ---------------------------------------------------------------------


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
