"""The hook layer's routing: which shard (if any) each token's delta comes from.

:class:`GateRoutingMixin` is the part of
:class:`~daemon.editors.hook.layer.HookedProjection` that scores tokens against
the stored keys and routes them; the projection's ``__init__`` sets the
attributes it declares and its forward pass applies the deltas of the routes.

Scope gate
----------
A token is routed to the shard of the nearest eligible stored key (``keys``, each
with its shard and reference: see :mod:`daemon.editors.hook.layer`). The rules,
their measured floors and costs live in :mod:`daemon.editors.hook.gate`. Two gates:

- **subject** (``scope`` set: a :class:`~daemon.editors.hook.scope.SubjectScope` the
  editor attaches): a token is scored only against the keys of the edits whose
  subject its sequence names up to it (cosine floor ``subject_cos_floor``, a
  persisted buffer that ``gate_subject_cos_floor = "auto"`` calibrates: see
  :mod:`daemon.editors.hook.floor`). The candidates are decided at the prefill and
  kept for the KV-cached decode steps.
  With ``snap_keys`` a routed token gets the value of the key it matched,
  ``keys[j] @ delta[s].T``, instead of ``x @ delta[s].T``: a rephrasing whose key
  is merely near the edit's then receives the edit's whole residual (on the small
  world, 300 edits: paraphrase .93 against .78 with ``x``). With ``share_route``
  the first hook layer of a forward decides for the layers above it (the key rows
  are the same in every hook), which halves the gate's cost.
- **key** (no scope, or no scope for this forward, e.g. ``inputs_embeds``): every
  token against every key, decided per token from its own key, so a one-token
  decode step is scored like the same position of a full forward pass.

Measured limit (2-layer micro world, hook layer 0, key at the prompt's last token):
the layer-0 input at the last token carries almost no subject information, so
same-template prompts about other subjects pass the key gate; deeper hook layers
separate far better and the editor's locate step should prefer them.

``gate_mode`` (``"auto"``, ``"open"``, ``"closed"``) forces the gate for tests and
diagnostics (``"open"`` applies the shard ``mask_shard``); ``"mask"`` (entered
through :func:`~daemon.editors.hook.wiring.gate_positions`) applies shard
``mask_shard``'s delta exactly at given token positions, which is how the editor
computes keys and residuals while it solves. ``last_route`` holds the shard per
token of the latest forward (-1: closed) and ``last_gate`` its boolean form
(neither persisted).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from daemon.editors.hook import deltas as shard_deltas
from daemon.editors.hook.deltas import ShardDelta
from daemon.editors.hook.gate import (
    CandidateTable,
    GateCache,
    Scope,
    SubjectScope,
    candidate_table,
    key_reach,
    route_table,
    route_tokens,
    routes_of,
    tensor_stamp,
)

GateMode = Literal["auto", "open", "closed", "mask"]

RouteParts = tuple[CandidateTable, torch.Tensor, torch.Tensor]  # table, fire, winner


class GateRoutingMixin:
    """Scores, routes and gate of a hook layer (``HookedProjection`` sets the state)."""

    d_in: int
    deltas: list[ShardDelta]
    _delta_version: int
    keys: torch.Tensor
    key_shard: torch.Tensor
    key_mean: torch.Tensor
    key_std: torch.Tensor
    center: torch.Tensor
    threshold: torch.Tensor
    threshold_floor: torch.Tensor
    cos_floor: torch.Tensor
    gate_mode: GateMode
    position_mask: torch.Tensor | None
    mask_shard: int
    _last_route: torch.Tensor | None
    _pending_route: tuple[tuple[int, ...], RouteParts | None] | None
    scope: SubjectScope | None
    subject_cos_floor: torch.Tensor
    snap_keys: bool
    share_route: bool
    _tables: tuple[torch.Tensor, tuple[Any, ...], CandidateTable | None] | None
    _per_key: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None] | None
    _gate_cache: GateCache | None

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
