"""The micro fact-world model, its tokenizer and probes, shared by the drift tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from daemon.drift.probes import BaseScores, Probe, score_base
from daemon.world.editsets import probes_from_world


@pytest.fixture(scope="session")
def micro_model(micro_world: Path) -> PreTrainedModel:
    """The micro world's model in eval mode. Read-only: copy it before changing weights."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(micro_world)
    cast(nn.Module, model).eval()
    return model


@pytest.fixture(scope="session")
def micro_tokenizer(micro_world: Path) -> Any:
    return AutoTokenizer.from_pretrained(micro_world)


@pytest.fixture(scope="session")
def world_probes(micro_world: Path) -> list[Probe]:
    """40 probes from the world's probe split."""
    return probes_from_world(micro_world, 40, seed=0)


@pytest.fixture(scope="session")
def base_scores(
    micro_model: PreTrainedModel, micro_tokenizer: Any, world_probes: list[Probe]
) -> BaseScores:
    return score_base(micro_model, micro_tokenizer, world_probes, k=16, batch_size=16)
