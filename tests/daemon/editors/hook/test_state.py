"""The hook editor's saved state: version 4 stores no sums and rebuilds them from the
records on load (bit for bit without retractions, to float64 round-off after one),
versions 2 and 3 load with their stored sums, and the state shrinks by the sums."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from daemon.editors.base import EditSpec
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.state import (
    MANIFEST,
    STATE_VERSION,
    TENSORS,
    LayerSums,
    Record,
    rebuild_sums,
    write_state,
)
from daemon.errors import EditorStateError
from daemon.model.loading import LoadedModel, load_model
from tests.daemon.editors.hook.conftest import (
    build_from_config,
    edit_specs,
    hook_config,
    prompt_logits,
)

SHARD_KEYS = 4  # key sites per shard: shard 0 takes two batches (see _three_batches)


def _editor(loaded: LoadedModel, stats: Path) -> HookEditor:
    return build_from_config(loaded, hook_config(shard_keys=SHARD_KEYS), stats_dir=stats)


def _prompts(edits: list[dict[str, Any]]) -> list[str]:
    return [e["prompt"] for e in edits] + [p["prompt"] for e in edits for p in e["locality"]]


def _three_batches(editor: HookEditor, edits: list[dict[str, Any]]) -> None:
    """Edits 0-1 and 2 into shard 0, edit 3 into shard 1 (edits 4 and 5 are kept back)."""
    for part in (edits[0:2], edits[2:3], edits[3:4]):
        assert all(o.accepted for o in editor.apply(edit_specs(part)))
    records = list(editor._records.values())
    assert [r.sites for r in records] == [1, 1, 1, 5]  # the edits of seed 3
    assert [r.shard for r in records] == [0, 0, 0, 1]
    assert [r.batch for r in records] == [1, 1, 2, 3]


def _stored_sums(editor: HookEditor) -> dict[str, torch.Tensor]:
    """The editor's live sums in the version-2/3 layout."""
    out: dict[str, torch.Tensor] = {}
    for layer, shards in editor._sums.items():
        out[f"sums.{layer}.moment"] = torch.stack([s.moment for s in shards]).cpu()
        out[f"sums.{layer}.key_outer"] = torch.stack([s.key_outer for s in shards]).cpu()
    return out


def _sums_bytes(editor: HookEditor) -> int:
    return sum(t.numel() * t.element_size() for t in _stored_sums(editor).values())


def _as_version_3(editor: HookEditor) -> dict[str, Any]:
    """The editor's state in the version-3 layout: the same plus the stored sums."""
    state = editor.state_dict()
    tensors = {**state["tensors"], **_stored_sums(editor)}
    return {"version": 3, "manifest": {**state["manifest"], "version": 3}, "tensors": tensors}


def _as_version_2(editor: HookEditor) -> dict[str, Any]:
    """The version-2 layout: stored sums and one dense ``delta`` stack per hook layer."""
    state = _as_version_3(editor)
    tensors = dict(state["tensors"])
    for layer in editor.hooks:
        prefix = f"hook.{layer}."
        mine = {
            k[len(prefix) :]: tensors.pop(k)
            for k in list(tensors)
            if k.startswith(prefix + "delta")
        }
        n = 1 + max(int(k.rsplit(".", 1)[1]) for k in mine)
        dense = [
            mine[f"delta.{s}"]
            if f"delta.{s}" in mine
            else mine[f"delta_up.{s}"] @ mine[f"delta_down.{s}"]
            for s in range(n)
        ]
        tensors[prefix + "delta"] = torch.stack(dense)
    return {"version": 2, "manifest": {**state["manifest"], "version": 2}, "tensors": tensors}


def _reloaded(micro_world: Path, stats: Path, state: dict[str, Any] | Path) -> HookEditor:
    fresh = load_model(str(micro_world), device="cpu")
    other = _editor(fresh, stats)
    if isinstance(state, Path):
        other.load(state)
    else:
        other.load_state_dict(state)
    return other


def test_a_saved_state_reloads_to_bit_identical_sums_and_logits(
    micro_world: Path,
    loaded: LoadedModel,
    stats: Path,
    edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Three batches over two shards: the file holds no sums, the reload rebuilds them."""
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    prompts = _prompts(edits)
    expected = prompt_logits(editor, prompts)
    editor.save(tmp_path / "hook")
    with safe_open(str(tmp_path / "hook" / TENSORS), framework="pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if n.startswith("sums.")]
    assert json.loads((tmp_path / "hook" / MANIFEST).read_text())["version"] == STATE_VERSION == 4
    assert not [n for n in editor.state_dict()["tensors"] if n.startswith("sums.")]
    for source in (tmp_path / "hook", editor.state_dict()):
        other = _reloaded(micro_world, stats, source)
        assert torch.equal(prompt_logits(other, prompts), expected)
        assert list(other._sums) == list(editor._sums)
        for layer, shards in editor._sums.items():
            assert len(other._sums[layer]) == len(shards) == 2
            for mine, theirs in zip(shards, other._sums[layer], strict=True):
                assert theirs.moment.dtype == torch.float64
                assert torch.equal(theirs.moment, mine.moment)
                assert torch.equal(theirs.key_outer, mine.key_outer)


def _assert_sums_close(a: list[LayerSums], b: list[LayerSums]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in ((x.moment, y.moment), (x.key_outer, y.key_outer)):
            scale = float(u.abs().max()) or 1.0
            torch.testing.assert_close(v, u, rtol=0.0, atol=1e-9 * scale)


def test_after_a_retraction_the_rebuilt_sums_agree_and_editing_goes_on_alike(
    micro_world: Path,
    loaded: LoadedModel,
    stats: Path,
    edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Live sums were built by plus then minus, the rebuilt ones without the retracted
    terms: equal to round-off; the emptied shard 1 has exact zeros in both; a further
    edit on each gives the same outputs."""
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    editor.retract([edits[1]["id"], edits[3]["id"]])  # shard 1 is emptied, not dropped
    editor.save(tmp_path / "hook")
    other = _reloaded(micro_world, stats, tmp_path / "hook")
    prompts = _prompts(edits)
    assert torch.equal(prompt_logits(other, prompts), prompt_logits(editor, prompts))
    for layer, shards in editor._sums.items():
        _assert_sums_close(shards, other._sums[layer])
        for sums in (shards[1], other._sums[layer][1]):
            assert not sums.moment.any() and not sums.key_outer.any()
    assert other._hook0().n_shards == editor._hook0().n_shards == 2
    for e in (editor, other):
        assert all(o.accepted for o in e.apply(edit_specs(edits[4:5])))
        assert e._records[edits[4]["id"]].shard == 1
    torch.testing.assert_close(
        prompt_logits(other, prompts), prompt_logits(editor, prompts), rtol=1e-5, atol=1e-5
    )
    for layer, shards in editor._sums.items():
        _assert_sums_close(shards, other._sums[layer])


def test_retracting_every_edit_reloads_to_one_empty_shard(
    micro_world: Path, loaded: LoadedModel, stats: Path, edits: list[dict[str, Any]]
) -> None:
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    editor.retract([e["id"] for e in edits[:4]])
    other = _reloaded(micro_world, stats, editor.state_dict())
    assert other._hook0().n_shards == 1
    (sums,) = other._sums[1]
    assert not sums.moment.any() and not sums.key_outer.any()


def test_a_version_3_state_loads_its_stored_sums(
    micro_world: Path,
    loaded: LoadedModel,
    stats: Path,
    edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The stored sums are used as they are; a version-3 state without them is refused."""
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    editor.retract([edits[1]["id"]])  # live sums now differ from a rebuild by round-off
    prompts = _prompts(edits)
    expected = prompt_logits(editor, prompts)
    old = _as_version_3(editor)
    write_state(tmp_path / "v3", old["manifest"], old["tensors"])
    for source in (tmp_path / "v3", old):
        other = _reloaded(micro_world, stats, source)
        assert other.applied_ids() == editor.applied_ids()
        assert torch.equal(prompt_logits(other, prompts), expected)
        for layer, shards in editor._sums.items():
            for mine, theirs in zip(shards, other._sums[layer], strict=True):
                assert torch.equal(theirs.moment, mine.moment)
                assert torch.equal(theirs.key_outer, mine.key_outer)
    bare = {**old, "tensors": {k: v for k, v in old["tensors"].items() if "sums." not in k}}
    fresh = _editor(load_model(str(micro_world), device="cpu"), stats)
    with pytest.raises(EditorStateError, match="sums"):
        fresh.load_state_dict(bare)


def test_a_version_2_state_with_dense_deltas_still_loads(
    micro_world: Path,
    loaded: LoadedModel,
    stats: Path,
    edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    prompts = _prompts(edits)
    expected = prompt_logits(editor, prompts)
    old = _as_version_2(editor)
    write_state(tmp_path / "v2", old["manifest"], old["tensors"])
    assert json.loads((tmp_path / "v2" / MANIFEST).read_text())["version"] == 2
    for source in (old, tmp_path / "v2"):
        other = _reloaded(micro_world, stats, source)
        assert other.applied_ids() == editor.applied_ids()
        assert not any(d.factored for d in other._hook0().deltas)  # read as stored
        torch.testing.assert_close(prompt_logits(other, prompts), expected, rtol=1e-4, atol=1e-4)
        other.retract([edits[0]["id"]])  # and it keeps working
        assert edits[0]["id"] not in other.applied_ids()


def test_the_saved_state_is_smaller_by_the_sums(
    loaded: LoadedModel, stats: Path, edits: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Without the sums the tensors file is smaller than the sums alone, and the
    version-3 layout of the same state is larger by at least their bytes."""
    editor = _editor(loaded, stats)
    _three_batches(editor, edits)
    editor.save(tmp_path / "v4")
    old = _as_version_3(editor)
    write_state(tmp_path / "v3", old["manifest"], old["tensors"])
    v4 = (tmp_path / "v4" / TENSORS).stat().st_size
    v3 = (tmp_path / "v3" / TENSORS).stat().st_size
    sums = _sums_bytes(editor)
    assert v4 < sums
    assert v3 - v4 >= sums


# --- rebuild_sums on synthetic records --------------------------------------------------


def _record(n: int, batch: int, shard: int, sites: int, gen: torch.Generator) -> Record:
    f64 = torch.float64
    return Record(
        spec=EditSpec(f"e{n}", f"prompt {n}", "target"),
        fact=f"fact {n}",
        batch=batch,
        shard=shard,
        keys={i: torch.randn(sites, 6, generator=gen, dtype=f64) for i in (2, 5)},
        outputs={i: torch.randn(sites, 4, generator=gen, dtype=f64) for i in (2, 5)},
    )


def test_rebuild_sums_adds_each_batch_to_its_shard() -> None:
    """Against the naive sum over rows, and bit for bit against batch-wise ``plus``;
    a shard without records gets zeros; a record outside the shards is refused."""
    gen = torch.Generator().manual_seed(0)
    plan = [(1, 0, 2), (1, 0, 1), (2, 2, 3), (3, 0, 1)]  # (batch, shard, sites)
    records = [_record(n, b, s, k, gen) for n, (b, s, k) in enumerate(plan)]
    widths = {2: (6, 4), 5: (6, 4)}
    sums = rebuild_sums(records, [2, 5], 3, widths, torch.device("cpu"))
    for layer in (2, 5):
        assert len(sums[layer]) == 3
        for shard in range(3):
            held = [r for r in records if r.shard == shard]
            moment = sum((r.outputs[layer].T @ r.keys[layer] for r in held), torch.zeros(4, 6))
            outer = sum((r.keys[layer].T @ r.keys[layer] for r in held), torch.zeros(6, 6))
            got = sums[layer][shard]
            assert got.moment.dtype == got.key_outer.dtype == torch.float64
            torch.testing.assert_close(got.moment, moment.double(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got.key_outer, outer.double(), rtol=1e-12, atol=1e-12)
        assert not sums[layer][1].moment.any() and not sums[layer][1].key_outer.any()
        zero = LayerSums(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(6, 6).double())
        first = [r for r in records if r.batch == 1]
        live = zero.plus(
            torch.cat([r.keys[layer] for r in first]),
            torch.cat([r.outputs[layer] for r in first]),
        ).plus(records[3].keys[layer], records[3].outputs[layer])
        assert torch.equal(sums[layer][0].moment, live.moment)
        assert torch.equal(sums[layer][0].key_outer, live.key_outer)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        rebuild_sums(records, [2], 2, widths, torch.device("cpu"))
