"""Shared fixtures of the hook editor tests: the micro world's model and edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits

N_EDITS = 6


@pytest.fixture(scope="module")
def edits(micro_world: Path) -> list[dict[str, Any]]:
    """Six counterfactual edits on the micro world (seed 3)."""
    loaded = load_model(str(micro_world), device="cpu")
    return counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, N_EDITS, seed=3)


@pytest.fixture
def loaded(micro_world: Path) -> LoadedModel:
    """A fresh copy of the micro world's model."""
    return load_model(str(micro_world), device="cpu")


@pytest.fixture
def stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The covariance statistics folder, shared by the session's hook tests (computed once)."""
    return tmp_path_factory.getbasetemp() / "hook-stats"
