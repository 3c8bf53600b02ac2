"""Helpers shared by the MELO editor tests."""

from __future__ import annotations

from typing import Any

import torch

from daemon.editors.base import EditSpec
from daemon.model.loading import LoadedModel

# A fixed radius for most tests (calibration has its own test): calibration gives
# ~0.23 on the micro world with unit-norm keys.
RADIUS = 0.25


def spec(record: dict[str, Any], *, rephrases: bool = False, **overrides: Any) -> EditSpec:
    """An EditSpec from a world edit request (rephrases only when asked)."""
    fields: dict[str, Any] = {
        "edit_id": record["id"],
        "prompt": record["prompt"],
        "target": record["target"],
        "subject": record["subject"],
        "relation": record["relation"],
        "rephrases": tuple(record["rephrases"]) if rephrases else (),
    }
    fields.update(overrides)
    return EditSpec(**fields)


@torch.no_grad()
def logits(loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """The model's logits ``[B, T, V]`` for a left-padded batch of prompts."""
    enc = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
    out: torch.Tensor = loaded.model(**enc).logits
    return out


def index_bytes(editor: Any) -> dict[str, Any]:
    """A MELO editor's live index ``to_state()`` with arrays as raw bytes (comparable)."""
    assert editor.index is not None
    state = editor.index.to_state()
    return {k: v if k == "manifest" else v.tobytes() for k, v in state.items()}
