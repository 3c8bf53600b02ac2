"""The hook editor's settings: everything it needs besides the model, built from
``[editors.hook]`` (see :func:`daemon.editors.hook.setup.settings_from_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from daemon.editors.hook.gate import DEFAULT_COS_FLOOR, DEFAULT_SUBJECT_COS_FLOOR
from daemon.editors.hook.keys import KeyKind
from daemon.editors.hook.targets import TargetSettings

GateScope = Literal["subject", "key"]
GATE_SCOPES: tuple[GateScope, ...] = ("subject", "key")


def stats_device_error(value: str) -> str | None:
    """Why ``value`` is no ``stats_device`` (``"model"`` or a torch device name), or None."""
    if value == "model":
        return None
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as exc:
        return f"must be 'model' or a torch device such as 'cpu' or 'cuda:0': {exc}"
    return None


@dataclass(frozen=True)
class HookSettings:
    """Everything the editor needs besides the model; built from ``[editors.hook]``."""

    layers: tuple[int, ...]
    key_position: KeyKind
    cov_weight: float = 10.0
    targets: TargetSettings = field(default_factory=TargetSettings)
    gate_threshold: float = 3.0
    gate_floor: float = 1.0
    max_update_norm_zscore: float = 6.0
    max_target_tokens: int = 8
    solve_rounds: int = 4
    gate_cos_floor: float = DEFAULT_COS_FLOOR
    shard_keys: int = 0  # live keys per shard; 0: half the smallest hook d_in
    check_recall: bool = True
    gate_scope: GateScope = "subject"  # "key": score every token against every key
    gate_subject_cos_floor: float = DEFAULT_SUBJECT_COS_FLOOR
    gate_snap_keys: bool = True  # subject gate: a routed token gets its matched key's value
    gate_shared_route: bool = True  # subject gate: the first hook layer decides for all
    stats_device: str = "model"  # where sums, covariance, records live: "model" or a device

    def __post_init__(self) -> None:
        reason = stats_device_error(self.stats_device)
        if reason is not None:
            raise ValueError(f"stats_device {self.stats_device!r} {reason}")
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"gate_scope must be one of {GATE_SCOPES}: {self.gate_scope!r}")
        if self.solve_rounds < 1 or not -1.0 <= self.gate_subject_cos_floor <= 1.0:
            raise ValueError("solve_rounds >= 1 and gate_subject_cos_floor in [-1, 1] are required")
        if self.shard_keys < 0 or not -1.0 <= self.gate_cos_floor <= 1.0:
            raise ValueError("shard_keys >= 0 and gate_cos_floor in [-1, 1] are required")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"hook layers must be a non-empty increasing list: {self.layers}")
        if self.max_target_tokens < 1 or self.cov_weight < 0:
            raise ValueError("max_target_tokens >= 1 and cov_weight >= 0 are required")
