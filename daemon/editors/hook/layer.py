"""Hook layers: a gated fp32 delta beside an MLP output projection whose weight stays intact.

``HookedProjection`` replaces a model's MLP output projection (``nn.Linear`` or
transformers' ``Conv1D``, told apart by ``daemon.model.arch``) with a wrapper that
computes, per token::

    y = base(x) + gate(x) * (x.float() @ delta.T)

in float32 and casts back to the base output's dtype. The base module and its weight
``W0`` are never touched, so a bf16/fp16 model keeps ``W0`` in its dtype while the
edits accumulate in the fp32 ``delta`` buffer ``(d_out, d_in)``. Where the gate is
closed for a token the output is the base output bit for bit.

Scope gate
----------
The hook stores the keys of its edits, ``keys`` ``(m, d_in)`` fp32 (one row per edit
key; rows can be removed for retraction, so the matrix is bounded by the live edits).
For a token with key ``x`` the score is the largest *centred* cosine similarity to a
stored key::

    s(x) = max_j cos(x - mu, k_j - mu)

where ``mu`` (``center``) is the mean key of non-edit text: centring removes the
component every MLP activation shares, which otherwise makes all cosines large.
The score becomes a z-score against a reference distribution of ``s`` on NON-EDIT
tokens (``ref_sum``, ``ref_sumsq``, ``ref_count``: float64 running sums, persisted in
``state_dict``), and the gate opens where ``z >= max(threshold, threshold_floor)``.
``calibrate_gates`` collects the reference from calibration text, excluding pad
tokens via the attention mask. Adding keys raises the scores of non-edit tokens, so
the editor re-calibrates after each batch (the reference is cheap: two forward
passes over the calibration prompts). Until a reference exists, or while no keys are
stored, the gate is closed and the model behaves as the base model.

Decode steps with a KV cache: the gate is decided **per token** from that token's own
key against the stored reference (never against per-sequence statistics), so a
one-token decode step is scored exactly like the same position in a full forward
pass; cached and uncached greedy generation agree. Prompt tokens are gated the same
way, so the edit fires at the in-scope position (e.g. the prompt's last token) and
the generated tokens follow from it.

Measured limit (2-layer micro world, hook layer 0, key at the prompt's last token):
the gate fires on 1 of 20 prompts about other subjects under other templates, but on
7 of 20 prompts about other subjects under the SAME template, because the layer-0
input at the last token carries almost no subject information (whitening with the key
covariance did not separate them either). Deeper hook layers separate far better;
the editor's locate step should prefer them.

``gate_mode`` (``"auto"``, ``"open"``, ``"closed"``) forces the gate for tests and
diagnostics; ``"mask"`` (entered through :func:`gate_positions`) applies the delta
exactly at given token positions, which is how the editor computes keys and
residuals while it solves: the edit's own key position is in scope by definition.
``last_gate`` holds the boolean gate of the latest forward (not persisted).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import structlog
import torch
from torch import nn

from daemon.model import arch

log = structlog.get_logger()

GateMode = Literal["auto", "open", "closed", "mask"]

DEFAULT_THRESHOLD = 3.0
"""Default z-score threshold of the scope gate."""

DEFAULT_THRESHOLD_FLOOR = 2.0
"""The threshold never goes below this, whatever an adaptive update asks for."""

_STD_EPS = 1e-6
_Calib = Literal["off", "center", "score"]


class HookedProjection(nn.Module):
    """An MLP output projection plus a gated fp32 delta; ``base`` is the original module."""

    delta: torch.Tensor
    keys: torch.Tensor
    center: torch.Tensor
    ref_sum: torch.Tensor
    ref_sumsq: torch.Tensor
    ref_count: torch.Tensor
    threshold: torch.Tensor
    threshold_floor: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        threshold_floor: float = DEFAULT_THRESHOLD_FLOOR,
    ) -> None:
        super().__init__()
        self.base = base
        d_in, d_out = arch.projection_in_out(base)
        device = arch.projection_weight_out_in(base).device
        self.d_in = d_in
        self.d_out = d_out
        f32, f64 = torch.float32, torch.float64
        self.register_buffer("delta", torch.zeros(d_out, d_in, dtype=f32, device=device))
        self.register_buffer("keys", torch.zeros(0, d_in, dtype=f32, device=device))
        self.register_buffer("center", torch.zeros(d_in, dtype=f32, device=device))
        self.register_buffer("ref_sum", torch.zeros((), dtype=f64, device=device))
        self.register_buffer("ref_sumsq", torch.zeros((), dtype=f64, device=device))
        self.register_buffer("ref_count", torch.zeros((), dtype=f64, device=device))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=f32, device=device))
        self.register_buffer(
            "threshold_floor", torch.tensor(threshold_floor, dtype=f32, device=device)
        )
        self.gate_mode: GateMode = "auto"
        self.position_mask: torch.Tensor | None = None  # [B, T] bool, for gate_mode "mask"
        self.last_gate: torch.Tensor | None = None
        self._has_delta = False
        # calibration state (set by calibrate_gates, never persisted)
        self._calib: _Calib = "off"
        self._token_mask: torch.Tensor | None = None
        self._center_sum: torch.Tensor | None = None
        self._center_count = 0

    # --- edits -------------------------------------------------------------------------

    def _as_delta(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        if tuple(delta_out_in.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"delta shape {tuple(delta_out_in.shape)} does not match the projection's "
                f"[out, in] = [{self.d_out}, {self.d_in}]"
            )
        if not bool(torch.isfinite(delta_out_in).all()):
            raise ValueError("delta holds non-finite values (NaN/inf)")
        return delta_out_in.detach().to(device=self.delta.device, dtype=torch.float32)

    @torch.no_grad()
    def set_delta(self, delta_out_in: torch.Tensor) -> None:
        """Replace the accumulated delta (``[out, in]``, any float dtype; stored fp32)."""
        self.delta.copy_(self._as_delta(delta_out_in))
        self._has_delta = bool(self.delta.any())

    @torch.no_grad()
    def add_delta(self, delta_out_in: torch.Tensor) -> None:
        """Add an ``[out, in]`` update to the delta (summed in float64, stored fp32)."""
        add = delta_out_in.detach().to(device=self.delta.device, dtype=torch.float64)
        self.delta.copy_(self._as_delta(self.delta.to(torch.float64) + add))
        self._has_delta = bool(self.delta.any())

    @torch.no_grad()
    def add_keys(self, keys_in_n: torch.Tensor) -> None:
        """Store edit keys given as columns ``(d_in, n)`` (MEMIT's layout)."""
        if keys_in_n.dim() != 2 or keys_in_n.shape[0] != self.d_in:
            raise ValueError(f"keys must be (d_in={self.d_in}, n); got {tuple(keys_in_n.shape)}")
        new = keys_in_n.detach().T.to(device=self.keys.device, dtype=torch.float32)
        self.keys = torch.cat([self.keys, new], dim=0)

    @torch.no_grad()
    def remove_keys(self, indices: Sequence[int]) -> None:
        """Drop stored keys by row index (for retraction and superseded edits)."""
        drop = set(indices)
        keep = [j for j in range(self.keys.shape[0]) if j not in drop]
        self.keys = self.keys[keep].clone()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget all edits: zero delta, no keys, no reference statistics (gate closed)."""
        self.delta.zero_()
        self._has_delta = False
        self.keys = self.keys.new_zeros(0, self.d_in)
        self.center.zero_()
        self.ref_sum.zero_()
        self.ref_sumsq.zero_()
        self.ref_count.zero_()

    @torch.no_grad()
    def set_threshold(self, z: float) -> float:
        """Set the z threshold (clamped at the floor); returns the effective value."""
        effective = max(float(z), float(self.threshold_floor))
        self.threshold.fill_(effective)
        return effective

    # --- gate ----------------------------------------------------------------------------

    def reference(self) -> tuple[float, float] | None:
        """``(mean, std)`` of the non-edit score distribution, or ``None`` before calibration."""
        n = float(self.ref_count)
        if n < 2:
            return None
        mean = float(self.ref_sum) / n
        var = max(float(self.ref_sumsq) / n - mean * mean, 0.0)
        return mean, max(var**0.5, _STD_EPS)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Max centred cosine of each token's key to the stored keys, shape ``x.shape[:-1]``."""
        xf = x.float() - self.center
        if self.keys.shape[0] == 0:
            return torch.full(xf.shape[:-1], float("-inf"), device=x.device)
        k = nn.functional.normalize(self.keys - self.center, dim=-1)
        xn = nn.functional.normalize(xf, dim=-1)
        return (xn @ k.T).amax(dim=-1)

    def zscores(self, x: torch.Tensor) -> torch.Tensor:
        """z-scores of ``scores(x)`` against the reference (``-inf`` when uncalibrated)."""
        ref = self.reference()
        s = self.scores(x)
        if ref is None:
            return torch.full_like(s, float("-inf"))
        mean, std = ref
        return (s - mean) / std

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean gate per token, shape ``x.shape[:-1]``."""
        if self.gate_mode == "open":
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        if self.gate_mode == "mask":
            if self.position_mask is None or tuple(self.position_mask.shape) != tuple(x.shape[:-1]):
                shape = None if self.position_mask is None else tuple(self.position_mask.shape)
                raise ValueError(f"gate position mask {shape} does not fit input {tuple(x.shape)}")
            return self.position_mask.to(x.device)
        if self.gate_mode == "closed" or self.keys.shape[0] == 0:
            return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        limit = max(float(self.threshold), float(self.threshold_floor))
        return self.zscores(x) >= limit

    # --- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib != "off":
            self._observe(x)
        out: torch.Tensor = self.base(x)
        if not self._has_delta or self.gate_mode == "closed":
            self.last_gate = None
            return out
        g = self.gate(x)
        self.last_gate = g
        if not bool(g.any()):
            return out
        update = (x.float() @ self.delta.T) * g.unsqueeze(-1).float()
        return (out.float() + update).to(out.dtype)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics over the non-pad tokens of ``x``."""
        flat = x.detach().float().reshape(-1, x.shape[-1])
        if self._token_mask is not None:
            flat = flat[self._token_mask.reshape(-1).to(flat.device)]
        if self._calib == "center":
            part = flat.to(torch.float64).sum(dim=0)
            self._center_sum = part if self._center_sum is None else self._center_sum + part
            self._center_count += int(flat.shape[0])
        elif self.keys.shape[0] > 0:
            s = self.scores(flat).to(torch.float64)
            self.ref_sum += s.sum()
            self.ref_sumsq += (s * s).sum()
            self.ref_count += s.numel()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        incoming = state_dict.get(prefix + "keys")
        if isinstance(incoming, torch.Tensor):  # the key matrix grows with the edits
            self.keys = self.keys.new_zeros(tuple(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_delta = bool(self.delta.any())

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, keys={self.keys.shape[0]}"


# --- installing ----------------------------------------------------------------------


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
) -> dict[int, HookedProjection]:
    """Wrap the MLP output projection of each of ``layers`` in a ``HookedProjection``."""
    hooks: dict[int, HookedProjection] = {}
    for i in layers:
        parent, name = _parent_and_name(model, i)
        current = getattr(parent, name)
        if isinstance(current, HookedProjection):
            raise ValueError(f"layer {i} already carries a hook")
        hook = HookedProjection(current, threshold=threshold, threshold_floor=threshold_floor)
        setattr(parent, name, hook)
        hooks[i] = hook
    log.debug("hooks_installed", layers=list(hooks))
    return hooks


def remove_hooks(model: nn.Module, hooks: Mapping[int, HookedProjection]) -> None:
    """Put the original projection modules back (the very same objects)."""
    for i, hook in hooks.items():
        parent, name = _parent_and_name(model, i)
        if getattr(parent, name) is not hook:
            raise ValueError(f"layer {i} does not carry the given hook")
        setattr(parent, name, hook.base)
    log.debug("hooks_removed", layers=list(hooks))


@contextmanager
def gate_positions(
    hooks: Mapping[int, HookedProjection], mask: torch.Tensor | None
) -> Iterator[None]:
    """Apply every hook's delta exactly where ``mask`` ``[B, T]`` is True (None: nowhere).

    Restores each hook's previous gate mode on exit. The editor uses this while it
    solves so that keys and residuals see the accumulated deltas at the edits' key
    positions only, as the gate would at inference.
    """
    saved = {i: (h.gate_mode, h.position_mask) for i, h in hooks.items()}
    for h in hooks.values():
        h.gate_mode = "closed" if mask is None else "mask"
        h.position_mask = None if mask is None else mask.bool()
    try:
        yield
    finally:
        for i, h in hooks.items():
            h.gate_mode, h.position_mask = saved[i]


@contextmanager
def _calibrating(hooks: Mapping[int, HookedProjection], mode: _Calib) -> Iterator[None]:
    for h in hooks.values():
        h._calib = mode
    try:
        yield
    finally:
        for h in hooks.values():
            h._calib = "off"
            h._token_mask = None


@torch.no_grad()
def calibrate_gates(
    model: nn.Module,
    hooks: Mapping[int, HookedProjection],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    batch_size: int = 32,
) -> None:
    """Set each hook's ``center`` and score reference from non-edit text (pads excluded).

    Two passes over the batch: the first measures the mean key (the centre), the
    second the distribution of the gate score given the stored keys. Previous
    reference statistics are replaced. The edit deltas are not applied meanwhile.
    """
    modes = {i: h.gate_mode for i, h in hooks.items()}
    for h in hooks.values():
        h.gate_mode = "closed"
        h._center_sum, h._center_count = None, 0
        h.ref_sum.zero_()
        h.ref_sumsq.zero_()
        h.ref_count.zero_()
    try:
        modes_seq: tuple[_Calib, ...] = ("center", "score")
        for mode in modes_seq:
            with _calibrating(hooks, mode):
                for start in range(0, input_ids.shape[0], batch_size):
                    ids = input_ids[start : start + batch_size]
                    mask = attention_mask[start : start + batch_size]
                    for h in hooks.values():
                        h._token_mask = mask.bool()
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            if mode == "center":
                for h in hooks.values():
                    if h._center_sum is not None and h._center_count > 0:
                        h.center.copy_((h._center_sum / h._center_count).float())
    finally:
        for i, h in hooks.items():
            h.gate_mode = modes[i]
            h._center_sum, h._center_count = None, 0
    log.debug(
        "gates_calibrated",
        tokens=int(attention_mask.sum()),
        reference={i: h.reference() for i, h in hooks.items()},
    )
