"""The hook (COMEBA-HK) back-end's configuration: the ``[editors.hook]`` section
(:class:`HookConfig`, validated once, here) and what building an editor resolves from it
and the model (:class:`HookLayout`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from daemon.config_fields import non_negative, positive, require
from daemon.editors.hook.keys import KeyKind

KeyPosition = Literal["auto", "subject_last", "prompt_last"]
GateScope = Literal["subject", "key"]
GATE_SCOPES: tuple[GateScope, ...] = ("subject", "key")


@dataclass(frozen=True)
class HookConfig:
    """COMEBA-HK: hook layers with closed-form consecutive updates and a scope gate.

    ``gate_scope = "subject"``: an edit is in scope only where its subject's tokens
    occur in the input, and a token is scored against those edits' keys alone
    (cosine floor ``gate_subject_cos_floor``: a number in [-1, 1], or ``"auto"`` to
    calibrate it from the model's own keys when the editor is built, see
    :mod:`daemon.editors.hook.setup`); ``"key"``: every token against every key (floor
    ``gate_cos_floor``). ``gate_snap_keys``: a routed token gets the
    output stored for the key it matched; ``gate_shared_route``: the lowest hook
    layer's routing serves the layers above it.

    ``stats_device``: where the float64 running sums, the covariance and the per-edit
    key rows live (they are read only when a batch is solved or retracted):
    ``"model"`` (with the model, the default), ``"cpu"`` (host memory: on a GPU the
    solve then runs on the CPU, slower, and only the applied deltas take GPU
    memory) or ``"cuda"``/``"cuda:N"``.
    """

    layers: tuple[int, ...] = ()
    key_position: KeyPosition = "auto"
    covariance_source: str = "auto"
    covariance_tokens: int = 100_000
    covariance_weight: float = 10.0
    target_steps: int = 25
    target_learning_rate: float = 0.5
    target_kl_weight: float = 0.0625
    target_norm_clamp: float = 4.0
    gate_threshold: float = 3.0
    gate_floor: float = 1.0
    gate_cos_floor: float = 0.7
    gate_scope: GateScope = "subject"
    gate_subject_cos_floor: float | Literal["auto"] = "auto"
    gate_snap_keys: bool = True
    gate_shared_route: bool = True
    shard_keys: int = 0  # live keys per shard; 0: half the smallest hook d_in
    max_update_norm_zscore: float = 6.0
    max_target_tokens: int = 8
    stats_device: str = "model"

    def __post_init__(self) -> None:
        require(-1.0 <= self.gate_cos_floor <= 1.0, "gate_cos_floor", "must be in [-1, 1]")
        require(
            self.gate_scope in GATE_SCOPES,
            "gate_scope",
            f"must be one of {GATE_SCOPES}; got {self.gate_scope!r}",
        )
        require(
            _is_stats_device(self.stats_device),
            "stats_device",
            f"must be 'model', 'cpu', 'cuda' or 'cuda:N'; got {self.stats_device!r}",
        )
        floor = self.gate_subject_cos_floor
        ok = floor == "auto" or (
            isinstance(floor, float | int) and not isinstance(floor, bool) and -1 <= floor <= 1
        )
        require(ok, "gate_subject_cos_floor", f"must be in [-1, 1] or 'auto'; got {floor!r}")
        non_negative(self, "shard_keys")
        positive(self, "covariance_tokens", "covariance_weight", "target_steps")
        positive(self, "target_learning_rate", "target_norm_clamp", "max_target_tokens")
        positive(self, "max_update_norm_zscore")
        non_negative(self, "target_kl_weight", "gate_threshold", "gate_floor")
        require(all(i >= 0 for i in self.layers), "layers", "layer indices must be >= 0")
        require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat a layer")


def _is_stats_device(value: str) -> bool:
    """``"model"``, or ``cpu`` / ``cuda`` / ``cuda:N`` as torch parses it (which refuses
    ``cuda:01`` and indices past its range)."""
    if value == "model":
        return True
    if re.fullmatch(r"cpu|cuda(:\d+)?", value) is None:
        return False
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class HookLayout:
    """What building an editor resolves from :class:`HookConfig` and the model: the hook
    layers (bottom-up) and key position (configured, else located, else the defaults;
    see :mod:`daemon.editors.hook.setup`) and the subject gate's cosine floor (the
    configured number; for ``"auto"`` the default until the floor is calibrated or loaded
    with a state)."""

    layers: tuple[int, ...]
    key_position: KeyKind
    subject_cos_floor: float

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"hook layers must be a non-empty increasing list: {self.layers}")
