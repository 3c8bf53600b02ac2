"""MELO apply as a transaction: failed verification, broken applied edits, crashes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from daemon.editors.base import EditSpec
from daemon.editors.melo import editor as editor_module
from daemon.editors.melo.editor import MeloEditor
from daemon.editors.melo.index import NeuronIndex
from daemon.model.loading import LoadedModel
from tests.daemon.editors.melo.helpers import index_bytes, logits, spec

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


def test_a_refused_batch_leaves_the_index_state_byte_identical(
    make_editor: Any, world_edits: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification failures roll the insert back: ``to_state()`` is unchanged, byte for byte."""
    editor = make_editor()
    editor.apply([spec(r) for r in world_edits[:3]])
    before = index_bytes(editor)
    routes = editor.route_blocks([r["prompt"] for r in world_edits[:5]])
    bad = {world_edits[3]["id"], world_edits[4]["id"]}
    monkeypatch.setattr(editor, "_verify", _failing_verify(editor, bad))
    outcomes = editor.apply([spec(r, rephrases=True) for r in world_edits[3:5]])
    assert not any(o.accepted for o in outcomes)
    assert index_bytes(editor) == before
    assert editor.route_blocks([r["prompt"] for r in world_edits[:5]]) == routes


def test_apply_never_copies_the_neuron_index(
    make_editor: Any, world_edits: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Insert-and-verify runs on the live index with an undo journal (no O(N) copy per batch)."""
    editor = make_editor()
    editor.apply([spec(world_edits[0])])

    def no_copy(self: NeuronIndex) -> NeuronIndex:
        raise AssertionError("the neuron index was copied")

    monkeypatch.setattr(NeuronIndex, "copy", no_copy)
    monkeypatch.setattr(editor, "_verify", _failing_verify(editor, {world_edits[2]["id"]}))
    outcomes = editor.apply([spec(r) for r in world_edits[1:3]])
    assert [o.accepted for o in outcomes] == [True, False]


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
