"""The hook editor's batch transaction and compact state: a refused batch changes
nothing and copies nothing, factored shards behave as dense ones, and the solve state
lives on ``stats_device`` (saved states: ``test_state.py``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from daemon.editors.base import EditSpec
from daemon.editors.hook import solve as solve_module
from daemon.editors.hook import targets as targets_module
from daemon.editors.hook.config import HookConfig
from daemon.editors.hook.editor import HookEditor
from daemon.model.loading import LoadedModel, load_model
from tests.daemon.editors.hook.conftest import (
    build_from_config,
    edit_specs,
    hook_config,
    prompt_logits,
)


def _editor(loaded: LoadedModel, stats: Path, **hook: Any) -> HookEditor:
    return build_from_config(loaded, hook_config(**hook), stats_dir=stats)


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert json.dumps(a["manifest"], sort_keys=True) == json.dumps(b["manifest"], sort_keys=True)
    assert sorted(a["tensors"]) == sorted(b["tensors"])
    for name, value in a["tensors"].items():
        assert torch.equal(value, b["tensors"][name]), name


def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    real = targets_module.optimise_targets

    def poisoned(*args: Any, **kwargs: Any) -> targets_module.TargetResult:
        result = real(*args, **kwargs)
        return dataclasses.replace(result, values=result.values * float("nan"))

    monkeypatch.setattr("daemon.editors.hook.editor.optimise_targets", poisoned)


def test_a_refused_batch_that_supersedes_and_opens_a_shard_leaves_the_state_unchanged(
    loaded: LoadedModel,
    stats: Path,
    edits: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retraction of the superseded edit, a new shard and the solve are all undone."""
    editor = _editor(loaded, stats)
    assert all(o.accepted for o in editor.apply(edit_specs(edits[:3])))
    before = editor.state_dict()
    editor._shard_keys = 1  # the next batch opens a shard
    _poison(monkeypatch)
    first = edits[0]
    newer = EditSpec(
        "newer", first["prompt"], edits[1]["target"], first["subject"], first["relation"]
    )
    outcomes = editor.apply([newer, *edit_specs(edits[3:5])])
    assert not any(o.accepted for o in outcomes)
    _assert_same_state(editor.state_dict(), before)
    assert editor._hook0().n_shards == 1


def test_the_rollback_snapshot_copies_no_tensor(
    loaded: LoadedModel, stats: Path, edits: list[dict[str, Any]]
) -> None:
    """The transaction keeps the live sums, deltas and gate keys themselves."""
    editor = _editor(loaded, stats)
    editor.apply(edit_specs(edits[:2]))
    snap = editor._snapshot()
    for layer, hook in editor.hooks.items():
        assert all(a is b for a, b in zip(snap["sums"][layer], editor._sums[layer], strict=True))
        kept = snap["hooks"][layer]
        assert kept.deltas is hook.deltas and kept.keys is hook.keys
        assert kept.key_mean is hook.key_mean and kept.key_std is hook.key_std


def test_factored_shards_give_the_dense_outputs(
    micro_world: Path, stats: Path, edits: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same batch solved into two factors or one dense matrix: the same logits
    (fp32 round-off), and the factors take less memory."""
    prompts = [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]
    factored_model = load_model(str(micro_world), device="cpu")
    factored = _editor(factored_model, stats)
    factored.apply(edit_specs(edits[:4]))
    monkeypatch.setattr(solve_module, "use_factors", lambda *_: False)
    dense_model = load_model(str(micro_world), device="cpu")
    dense = _editor(dense_model, stats)
    dense.apply(edit_specs(edits[:4]))
    (f_delta,), (d_delta,) = factored._hook0().deltas, dense._hook0().deltas
    assert f_delta.factored and not d_delta.factored
    assert f_delta.nbytes < d_delta.nbytes
    torch.testing.assert_close(f_delta.to_dense(), d_delta.to_dense(), rtol=1e-4, atol=1e-6)
    f_logits = prompt_logits(factored_model, prompts)
    torch.testing.assert_close(f_logits, prompt_logits(dense_model, prompts), rtol=1e-4, atol=1e-4)


def test_the_solve_state_lives_on_stats_device(
    loaded: LoadedModel, stats: Path, edits: list[dict[str, Any]]
) -> None:
    editor = _editor(loaded, stats, stats_device="cpu")
    assert all(o.accepted for o in editor.apply(edit_specs(edits[:2])))
    cpu = torch.device("cpu")
    assert all(s.moment.device == cpu and s.key_outer.device == cpu for s in editor._sums[1])
    assert editor._cov[1].device == cpu
    assert all(r.keys[1].device == cpu for r in editor._records.values())


def test_stats_device_is_validated() -> None:
    """The pattern, then torch: ``cuda:01`` fits the first but is no torch device."""
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'") as bad:
        HookConfig(stats_device="gpu")
    assert getattr(bad.value, "key", None) == "stats_device"
    with pytest.raises(ValueError, match="got 'cuda:01'") as unparsed:
        HookConfig(stats_device="cuda:01")
    assert getattr(unparsed.value, "key", None) == "stats_device"
    assert HookConfig(stats_device="cuda:1").stats_device == "cuda:1"
    assert HookConfig().stats_device == "model"
