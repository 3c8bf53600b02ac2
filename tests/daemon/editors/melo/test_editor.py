"""The MELO editor on the micro fact world: edits, routing, isolation, retraction, state."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from daemon.editors.base import Editor, EditSpec
from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import MeloEditor
from daemon.errors import ConfigError, EditorStateError
from daemon.model import arch
from daemon.model.answers import continuation_matches
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from tests.daemon.editors.melo.helpers import RADIUS, logits, spec

Records = list[dict[str, Any]]


def _answer(editor: MeloEditor, loaded: LoadedModel, prompts: list[str]) -> list[str]:
    with editor.routing(prompts):
        return greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6)


def _answer_plain(loaded: LoadedModel, prompt: str) -> str:
    return greedy_continuations(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=6)[0]


def _routed_logits(editor: MeloEditor, loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    with editor.routing(prompts):
        return logits(loaded, prompts)


def _unrouted_locality(editor: MeloEditor, records: Records) -> list[str]:
    prompts = [p["prompt"] for r in records for p in r["locality"]]
    return [p for p, b in zip(prompts, editor.route_blocks(prompts), strict=True) if b is None]


def test_is_an_editor_and_reports_its_memory(make_editor: Any, loaded: LoadedModel) -> None:
    """MeloEditor satisfies the Editor protocol; stats report blocks, bytes and the index."""
    editor: MeloEditor = make_editor(max_blocks=8, rank_per_block=2)
    as_protocol: object = editor
    assert isinstance(as_protocol, Editor)
    assert editor.name == "melo"
    stats = editor.stats()
    assert stats["capacity"] == 8 and stats["blocks_used"] == 0 and stats["blocks_free"] == 8
    # one rank-2 block of the MLP output projection of one layer, float32: r * (in + out) * 4
    d_in, d_out = arch.intermediate_size(loaded.model), arch.hidden_size(loaded.model)
    assert stats["bytes_per_block"] == 2 * (d_in + d_out) * 4
    assert stats["keys"] == 0 and stats["clusters"] == 0 and stats["approximate_index"] is False


def test_edit_answers_target_and_unrelated_logits_are_bit_identical(
    make_editor: Any, loaded: LoadedModel, base: LoadedModel, world_edits: Records
) -> None:
    """An edited prompt greedy-decodes its target; an unrouted prompt's logits equal the base's."""
    editor = make_editor()
    records = world_edits[:3]
    outcomes = editor.apply([spec(r) for r in records])
    assert [o.accepted for o in outcomes] == [True, True, True], outcomes
    answers = _answer(editor, loaded, [r["prompt"] for r in records])
    assert all(continuation_matches(a, r["target"]) for a, r in zip(answers, records, strict=True))
    unrelated = _unrouted_locality(editor, records)
    assert unrelated, "expected locality probes outside every radius"
    assert torch.equal(_routed_logits(editor, loaded, unrelated), logits(base, unrelated))
    assert editor.applied_ids() == [r["id"] for r in records]


def test_rephrases_route_to_the_block_when_trained_with_them(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Sent rephrases are indexed under the edit and trained into its block: they answer it."""
    editor = make_editor()
    record = world_edits[0]
    assert editor.apply([spec(record, rephrases=True)])[0].accepted
    block = editor.table.block_of(record["id"])
    assert editor.route_blocks(record["rephrases"]) == [block] * len(record["rephrases"])
    answers = _answer(editor, loaded, list(record["rephrases"]))
    assert all(continuation_matches(a, record["target"]) for a in answers), answers


def test_two_threads_routed_to_different_blocks_both_answer_right(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Concurrent generations in two threads each keep their own per-request routes."""
    editor = make_editor()
    records = world_edits[:2]
    assert all(o.accepted for o in editor.apply([spec(r) for r in records]))
    blocks = editor.route_blocks([r["prompt"] for r in records])
    assert blocks[0] is not None and blocks[1] is not None and blocks[0] != blocks[1]
    barrier = threading.Barrier(2)
    results: dict[int, list[bool]] = {0: [], 1: []}

    def run(i: int) -> None:
        prompt, target = records[i]["prompt"], records[i]["target"]
        for _ in range(4):
            barrier.wait()
            with editor.routing([prompt]):
                text = _answer_plain(loaded, prompt)
            results[i].append(continuation_matches(text, target))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {0: [True] * 4, 1: [True] * 4}


def test_retraction_restores_base_logits_exactly_and_frees_the_block(
    make_editor: Any, loaded: LoadedModel, base: LoadedModel, world_edits: Records
) -> None:
    """A retracted prompt runs the base model bit for bit; other edits keep working."""
    editor = make_editor()
    first, second = world_edits[0], world_edits[1]
    editor.apply([spec(first), spec(second)])
    editor.retract([first["id"]])
    assert editor.route_blocks([first["prompt"]]) == [None]
    assert torch.equal(
        _routed_logits(editor, loaded, [first["prompt"]]), logits(base, [first["prompt"]])
    )
    assert continuation_matches(_answer(editor, loaded, [second["prompt"]])[0], second["target"])
    assert editor.table.snapshot() == {
        "capacity": editor.config.max_blocks,
        "blocks": {1: [second["id"]]},
    }
    assert editor.applied_ids() == [second["id"]]


def test_retracting_unknown_ids_raises_before_any_change(
    make_editor: Any, world_edits: Records
) -> None:
    """Unknown ids name themselves in the error and nothing is retracted."""
    editor = make_editor()
    editor.apply([spec(world_edits[0])])
    with pytest.raises(EditorStateError, match="nope"):
        editor.retract([world_edits[0]["id"], "nope"])
    assert editor.applied_ids() == [world_edits[0]["id"]]
    assert editor.stats()["keys"] == 1


def test_block_table_after_allocate_free_and_reuse(make_editor: Any, world_edits: Records) -> None:
    """Blocks go lowest-free first; a retracted edit's block is reused by the next edit."""
    editor = make_editor(max_blocks=4)
    a, b, c, d = (world_edits[i] for i in range(4))
    editor.apply([spec(a), spec(b), spec(c)])
    assert editor.table.snapshot()["blocks"] == {0: [a["id"]], 1: [b["id"]], 2: [c["id"]]}
    editor.retract([b["id"]])
    assert editor.table.snapshot()["blocks"] == {0: [a["id"]], 2: [c["id"]]}
    assert editor.apply([spec(d)])[0].details["block"] == 1
    assert editor.table.snapshot()["blocks"] == {0: [a["id"]], 1: [d["id"]], 2: [c["id"]]}
    assert editor.stats()["blocks_free"] == 1


def test_edits_per_block_groups_edits_into_one_block(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """With edits_per_block=2 two edits share a block and both answer their targets."""
    editor = make_editor(edits_per_block=2)
    records = world_edits[4:6]
    assert all(o.accepted for o in editor.apply([spec(r) for r in records]))
    assert editor.table.snapshot()["blocks"] == {0: [r["id"] for r in records]}
    answers = _answer(editor, loaded, [r["prompt"] for r in records])
    assert all(continuation_matches(a, r["target"]) for a, r in zip(answers, records, strict=True))


def test_full_table_refuses_with_the_capacity_reason_and_logs(
    make_editor: Any, loaded: LoadedModel, base: LoadedModel, world_edits: Records
) -> None:
    """Past capacity edits are refused with a reason, never silently dropped."""
    editor = make_editor(max_blocks=2)
    records = world_edits[:3]
    with capture_logs() as logs:
        outcomes = editor.apply([spec(r) for r in records])
    assert [o.accepted for o in outcomes] == [True, True, False]
    assert outcomes[2].reason is not None and "full" in outcomes[2].reason
    assert any(e["event"] == "melo_block_table_full" for e in logs)
    prompt = [records[2]["prompt"]]
    assert torch.equal(_routed_logits(editor, loaded, prompt), logits(base, prompt))


def test_conflicting_and_invalid_edits_are_refused_with_reasons(
    make_editor: Any, world_edits: Records
) -> None:
    """Same prompt with two targets in a batch, a re-edit, a too-long target: all refused."""
    editor = make_editor()
    a, b = world_edits[0], world_edits[1]
    clash = spec(a, edit_id="clash", target=b["target"])
    outcomes = editor.apply([spec(a), clash, spec(b)])
    assert [o.accepted for o in outcomes] == [False, False, True]
    assert "clash" in (outcomes[0].reason or "") and a["id"] in (outcomes[1].reason or "")
    again = editor.apply([spec(b, edit_id="again", target=a["target"])])[0]
    assert not again.accepted and b["id"] in (again.reason or "")
    assert not editor.apply([spec(b)])[0].accepted  # the same id twice
    long_target = " " + " ".join([b["target"].strip()] * 40)  # well past 16 tokens
    too_long = editor.apply([spec(a, edit_id="long", target=long_target)])[0]
    assert not too_long.accepted and "max_target_tokens" in (too_long.reason or "")
    assert editor.applied_ids() == [b["id"]]


def test_a_key_that_joins_another_blocks_cluster_survives_that_blocks_retraction(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Same prompt and target twice: the second key joins; retracting the first reassigns."""
    editor = make_editor()
    record = world_edits[0]
    twin = spec(record, edit_id="twin")
    editor.apply([spec(record)])
    outcome = editor.apply([twin])[0]
    assert outcome.accepted, outcome
    assert editor.route_blocks([record["prompt"]]) == [0]  # the cluster opened by block 0
    editor.retract([record["id"]])
    assert editor.route_blocks([record["prompt"]]) == [1]  # reassigned to the twin's block
    answer = _answer(editor, loaded, [record["prompt"]])[0]
    assert continuation_matches(answer, record["target"])


def test_state_round_trips_through_files_and_state_dict_bit_identically(
    make_editor: Any,
    loaded: LoadedModel,
    micro_world: Path,
    world_edits: Records,
    tmp_path: Path,
) -> None:
    """save/load and state_dict/load_state_dict on a fresh model give the same logits."""
    editor = make_editor()
    records = world_edits[:3]
    editor.apply([spec(records[0], rephrases=True), spec(records[1]), spec(records[2])])
    editor.retract([records[1]["id"]])
    prompts = [r["prompt"] for r in records] + list(records[0]["rephrases"])
    prompts += [p["prompt"] for p in records[0]["locality"]]
    expected = _routed_logits(editor, loaded, prompts)
    editor.save(tmp_path / "melo")
    for via_files in (True, False):
        fresh = load_model(str(micro_world), device="cpu")
        other = MeloEditor(
            fresh.model, fresh.tokenizer, MeloConfig(radius=RADIUS, key_position="prompt_last")
        )
        try:
            if via_files:
                other.load(tmp_path / "melo")
            else:
                other.load_state_dict(editor.state_dict())
            assert other.applied_ids() == editor.applied_ids()
            assert other.table.snapshot() == editor.table.snapshot()
            assert torch.equal(_routed_logits(other, fresh, prompts), expected)
        finally:
            other.close()


def test_state_of_another_version_or_shape_is_refused(
    make_editor: Any, micro_world: Path, tmp_path: Path
) -> None:
    """Unknown versions, differently built editors and bad files are refused."""
    editor = make_editor()
    state = editor.state_dict()
    with pytest.raises(EditorStateError, match="version"):
        editor.load_state_dict({**state, "version": 99})
    fresh = load_model(str(micro_world), device="cpu")
    other = MeloEditor(fresh.model, fresh.tokenizer, MeloConfig(rank_per_block=2))
    try:
        with pytest.raises(EditorStateError, match="settings"):
            other.load_state_dict(state)
    finally:
        other.close()
    (tmp_path / "manifest.json").write_text('{"format_version": 7}')
    with pytest.raises(EditorStateError, match="format version"):
        editor.load(tmp_path)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"key_layer": 1}, "key_layer"),
        ({"layers": (0,)}, "key_layer"),
        ({"layers": (5,)}, "layers"),
    ],
)
def test_bad_layers_raise_a_config_error(
    loaded: LoadedModel, config: dict[str, Any], key: str
) -> None:
    """The key layer must lie below every LoRA layer, and layers must exist."""
    with pytest.raises(ConfigError) as info:
        MeloEditor(loaded.model, loaded.tokenizer, MeloConfig(**config))
    assert info.value.key == f"editors.melo.{key}"


def test_calibrated_radius_routes_edits_and_spares_locality(
    loaded: LoadedModel, world_edits: Records
) -> None:
    """radius = 0 calibrates once at the first apply; edits verify, most probes stay unrouted."""
    editor = MeloEditor(
        loaded.model, loaded.tokenizer, MeloConfig(radius=0.0, seed=3, key_position="prompt_last")
    )
    try:
        records = world_edits[:4]
        with capture_logs() as logs:
            outcomes = editor.apply([spec(r) for r in records])
        assert all(o.accepted for o in outcomes), outcomes
        calibrated = [e for e in logs if e["event"] == "melo_radius_calibrated"]
        assert len(calibrated) == 1 and calibrated[0]["radius"] > 0
        editor.apply([spec(world_edits[5])])
        assert editor.stats()["radius"] == calibrated[0]["radius"]  # once per editor
        assert len(_unrouted_locality(editor, records)) >= 0.8 * sum(
            len(r["locality"]) for r in records
        )
    finally:
        editor.close()


def test_close_restores_the_base_model(
    loaded: LoadedModel, base: LoadedModel, world_edits: Records
) -> None:
    """After close() the model has no LoRA wrappers and answers exactly as the base."""
    editor = MeloEditor(
        loaded.model, loaded.tokenizer, MeloConfig(radius=RADIUS, key_position="prompt_last")
    )
    editor.apply([spec(world_edits[0])])
    editor.close()
    prompt = [world_edits[0]["prompt"]]
    assert torch.equal(logits(loaded, prompt), logits(base, prompt))


def test_empty_batch_and_edit_spec_fields(make_editor: Any) -> None:
    """An empty batch is a no-op; EditSpec validation happens before the editor."""
    editor = make_editor()
    assert editor.apply([]) == []
    with pytest.raises(ValueError):
        EditSpec("x", "prompt", " ")


def test_a_state_loads_under_another_max_blocks_when_its_blocks_fit(
    make_editor: Any, micro_world: Path, world_edits: list[dict[str, Any]]
) -> None:
    """max_blocks is a limit, not a shape: a state loads wherever its block ids fit."""
    source = make_editor(max_blocks=8)
    source.apply([spec(r) for r in world_edits[:3]])
    state = source.state_dict()
    for max_blocks in (100_000, 2):
        fresh = load_model(str(micro_world), device="cpu")
        config = MeloConfig(radius=RADIUS, max_blocks=max_blocks, key_position="prompt_last")
        other = MeloEditor(fresh.model, fresh.tokenizer, config)
        try:
            if max_blocks == 2:  # blocks 0..2 do not fit: a clear refusal
                with pytest.raises(EditorStateError, match="does not fit max_blocks"):
                    other.load_state_dict(state)
                continue
            other.load_state_dict(state)
            assert other.table.capacity == max_blocks
            assert other.table.snapshot()["blocks"] == source.table.snapshot()["blocks"]
            assert other.route_blocks([world_edits[1]["prompt"]]) == [1]
        finally:
            other.close()
