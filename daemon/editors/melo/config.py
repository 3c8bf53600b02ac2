"""``[editors.melo]``: the MELO back-end's whole configuration section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from daemon.config_fields import non_negative, positive, require


@dataclass(frozen=True)
class MeloConfig:
    """MELO: LoRA blocks routed by a neuron-key index. Empty ``layers`` and
    ``key_layer = -1`` mean the architecture table's defaults; ``radius = 0``
    means calibrate from the key-distance distribution."""

    layers: tuple[int, ...] = ()
    key_layer: int = -1
    rank_per_block: int = 4
    edits_per_block: int = 1
    max_blocks: int = 100_000  # a limit: LoRA blocks are created as used (see melo.layer)
    learning_rate: float = 1e-2
    max_steps: int = 100
    radius: float = 0.0
    radius_fraction: float = 0.5
    stop_nll: float = 0.02
    max_target_tokens: int = 16
    exact_index_max: int = 10000
    seed: int = 0
    key_position: Literal["prompt_last", "subject_last"] = "subject_last"
    prompt_radius: float = 0.03

    def __post_init__(self) -> None:
        positive(self, "rank_per_block", "edits_per_block", "max_blocks", "learning_rate")
        positive(self, "max_steps", "exact_index_max", "radius_fraction", "max_target_tokens")
        non_negative(self, "radius", "stop_nll")
        positive(self, "prompt_radius")
        require(self.key_layer >= -1, "key_layer", "must be -1 (auto) or a layer index")
        require(all(i >= 0 for i in self.layers), "layers", "layer indices must be >= 0")
