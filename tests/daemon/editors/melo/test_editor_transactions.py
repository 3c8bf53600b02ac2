"""MELO apply as a transaction: failed verification, broken applied edits, crashes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from daemon.editors.base import EditSpec
from daemon.editors.melo import editor as editor_module
from daemon.editors.melo.editor import MeloEditor
from daemon.model.loading import LoadedModel
from tests.daemon.editors.melo.helpers import logits, spec

Records = list[dict[str, Any]]


def _failing_verify(editor: MeloEditor, fail: set[str]) -> Any:
    real = editor._verify

    def verify(specs: list[EditSpec]) -> dict[str, str]:
        out = real(specs)
        out.update({s.edit_id: " nonsense" for s in specs if s.edit_id in fail})
        return out

    return verify


def _routed_logits(editor: MeloEditor, loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    with editor.routing(prompts):
        return logits(loaded, prompts)


def test_an_edit_failing_verification_leaves_no_trace(
    make_editor: Any,
    loaded: LoadedModel,
    base: LoadedModel,
    world_edits: Records,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused with the generated text; its keys, block and routes are gone."""
    editor = make_editor()
    keep, bad = world_edits[0], world_edits[1]
    editor.apply([spec(keep)])
    before = editor.index
    monkeypatch.setattr(editor, "_verify", _failing_verify(editor, {bad["id"]}))
    outcome = editor.apply([spec(bad)])[0]
    assert not outcome.accepted
    assert (outcome.reason or "").startswith("verification failed: got ' nonsense'")
    assert editor.index is before  # the live index was never replaced
    assert editor.table.snapshot()["blocks"] == {0: [keep["id"]]}
    assert editor.route_blocks([bad["prompt"]]) == [None]
    prompt = [bad["prompt"]]
    assert torch.equal(_routed_logits(editor, loaded, prompt), logits(base, prompt))


def test_a_group_that_would_break_an_applied_edit_is_refused(
    make_editor: Any, world_edits: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When an applied edit re-routes and fails, the whole new group is rolled back."""
    editor = make_editor()
    old, new = world_edits[0], world_edits[1]
    editor.apply([spec(old)])
    monkeypatch.setattr(editor, "_rerouted", lambda *args: {old["id"]})
    monkeypatch.setattr(editor, "_verify", _failing_verify(editor, {old["id"]}))
    outcome = editor.apply([spec(new)])[0]
    assert not outcome.accepted and old["id"] in (outcome.reason or "")
    assert "would break" in (outcome.reason or "")
    assert editor.applied_ids() == [old["id"]] and editor.stats()["keys"] == 1


def test_a_crash_during_training_rolls_the_group_back(
    make_editor: Any, world_edits: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception mid-group frees the block and keeps the index; the editor stays usable."""
    editor = make_editor()
    editor.apply([spec(world_edits[0])])

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(editor_module, "train_block", boom)
        with pytest.raises(RuntimeError, match="boom"):
            editor.apply([spec(world_edits[1])])
    assert editor.table.snapshot()["blocks"] == {0: [world_edits[0]["id"]]}
    assert editor.applied_ids() == [world_edits[0]["id"]]
    assert editor.apply([spec(world_edits[1])])[0].accepted
