"""Fixtures for the MELO editor tests: the micro world's model, real counterfactual edits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import MeloEditor
from daemon.model.loading import LoadedModel, load_model
from tests.daemon.editors.melo.helpers import RADIUS


@pytest.fixture(scope="module")
def base(micro_world: Path) -> LoadedModel:
    """A micro-world model that no editor ever touches: the reference for base logits."""
    return load_model(str(micro_world), device="cpu")


@pytest.fixture(scope="module")
def world_edits(micro_world: Path, base: LoadedModel) -> list[dict[str, Any]]:
    """Twelve counterfactual edit requests (with rephrases and locality probes)."""
    from daemon.world.editsets import counterfactual_edits

    return counterfactual_edits(micro_world, base.model, base.tokenizer, 12)


@pytest.fixture
def loaded(micro_world: Path) -> LoadedModel:
    """A fresh copy of the micro-world model for one test (editors modify it)."""
    return load_model(str(micro_world), device="cpu")


@pytest.fixture
def make_editor(loaded: LoadedModel) -> Iterator[Any]:
    """Build MeloEditors on ``loaded``; each is closed (LoRA removed) after the test.

    Prompt-last keys unless a test asks otherwise: these tests pin that mode's exact
    routing (``test_subject_keys`` covers the default, subject keys)."""
    made: list[MeloEditor] = []

    def build(**config: Any) -> MeloEditor:
        editor = MeloEditor(
            loaded.model,
            loaded.tokenizer,
            MeloConfig(**{"radius": RADIUS, "key_position": "prompt_last", **config}),
        )
        made.append(editor)
        return editor

    yield build
    for editor in reversed(made):
        editor.close()
