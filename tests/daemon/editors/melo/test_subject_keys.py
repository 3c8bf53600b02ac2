"""MELO with ``key_position = "subject_last"``: keys at the subject, any prompt token routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import SUBJECT_RADIUS, MeloEditor
from daemon.editors.melo.keys import KeyReader
from daemon.editors.melo.routing import route_rows
from daemon.errors import EditorStateError
from daemon.model.answers import continuation_matches
from daemon.model.chat import chat_prompt, chat_suffix, user_text_end
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel, load_model
from daemon.model.tokens import subject_last_token_index
from tests.daemon.editors.melo.helpers import index_bytes, logits, spec

Records = list[dict[str, Any]]


def _subject_editor(make_editor: Any) -> MeloEditor:
    editor: MeloEditor = make_editor(key_position="subject_last", radius=0.0)
    return editor


def test_a_subject_key_is_the_subject_tokens_key_and_a_missing_subject_falls_back(
    loaded: LoadedModel,
) -> None:
    """``KeyReader(prompts, subjects)`` reads each prompt at its subject's last token
    (padded or alone), at the last token where the subject is None or absent."""
    reader = KeyReader(loaded.model, loaded.tokenizer, 1)
    try:
        prompts = ["Jane Roe works for the company called", "Acme"]
        subjects: list[str | None] = ["Jane Roe", "Zed"]
        keys = reader(prompts, subjects)
        tokens = reader.token_keys(prompts)
        at = subject_last_token_index(loaded.tokenizer, prompts[0], "Jane Roe")
        np.testing.assert_allclose(keys[0], tokens[0][at], atol=1e-5)
        np.testing.assert_allclose(keys[1], tokens[1][-1], atol=1e-5)
        np.testing.assert_allclose(reader(prompts)[0], tokens[0][-1], atol=1e-5)
        assert not np.allclose(keys[0], reader(prompts)[0], atol=1e-3)
        np.testing.assert_allclose(reader(prompts[:1], ["Jane Roe"])[0], keys[0], atol=1e-5)
        with pytest.raises(ValueError, match="subjects"):
            reader(prompts, ["Jane Roe"])
    finally:
        reader.close()


def test_subject_keys_route_unsent_rephrases_and_not_other_subjects(
    make_editor: Any, loaded: LoadedModel, base: LoadedModel, world_edits: Records
) -> None:
    """Rephrases never sent to the editor route to the edit's block by its subject's key,
    and answer the target; locality probes about other subjects stay unrouted, with the
    base model's logits. (Probes about an edited subject's other relations may route:
    the price of subject keys, measured in ``bench/melo_keys.py``.)"""
    editor = _subject_editor(make_editor)
    assert editor.key_layer < min(editor.layers) and editor.calibrate() == SUBJECT_RADIUS
    records = world_edits[:4]
    outcomes = editor.apply([spec(r) for r in records])
    assert all(o.accepted for o in outcomes), outcomes
    routed = answered = total = 0
    for record in records:
        block = editor.table.block_of(record["id"])
        rephrases = list(record["rephrases"])
        routes = editor.route_blocks(rephrases)
        routed += sum(b == block for b in routes)
        with editor.routing(rephrases):
            replies = greedy_continuations(
                loaded.model, loaded.tokenizer, rephrases, max_new_tokens=6
            )
        answered += sum(continuation_matches(a, record["target"]) for a in replies)
        total += len(rephrases)
    assert routed >= total * 3 // 4, (routed, total)  # 11 of 12 when written
    assert answered >= total // 2, (answered, total)
    locality = [p["prompt"] for r in records for p in r["locality"]]
    subjects = [r["subject"] for r in records]
    others = [p for p in locality if not any(s in p for s in subjects)]
    assert others and editor.route_blocks(others) == [None] * len(others)
    with editor.routing(others):
        edited = logits(loaded, others)
    assert torch.equal(edited, logits(base, others))


def test_routes_decided_in_the_prefill_equal_the_routes_computed_up_front(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """The inline router (keys of every prompt token in the request's own prefill) gives
    the same logits as routing each row by ``route_blocks`` up front."""
    editor = _subject_editor(make_editor)
    records = world_edits[:3]
    editor.apply([spec(r) for r in records])
    prompts = [records[0]["rephrases"][0], records[1]["locality"][0]["prompt"]]
    prompts += [records[2]["prompt"], "Nothing to see"]
    blocks = editor.route_blocks(prompts)
    assert blocks[0] is not None and blocks[1] is None and blocks[2] is not None
    with editor.routing(prompts):
        inline = logits(loaded, prompts)
    with route_rows(blocks):
        up_front = logits(loaded, prompts)
    assert torch.allclose(inline, up_front, atol=1e-5)


def test_a_subject_keyed_state_round_trips_and_refuses_a_last_token_editor(
    make_editor: Any, micro_world: Path, world_edits: Records, tmp_path: Path
) -> None:
    """The key position is part of the state's settings: a state loads only into an
    editor that keys the same way; one saved before the setting existed is prompt_last."""
    editor = _subject_editor(make_editor)
    editor.apply([spec(world_edits[0])])
    editor.save(tmp_path / "melo")
    prompts = list(world_edits[0]["rephrases"])
    fresh = load_model(str(micro_world), device="cpu")
    same = MeloEditor(fresh.model, fresh.tokenizer, MeloConfig(key_position="subject_last"))
    try:
        same.load(tmp_path / "melo")
        assert same.route_blocks(prompts) == editor.route_blocks(prompts)
    finally:
        same.close()
    other = MeloEditor(
        fresh.model, fresh.tokenizer, MeloConfig(radius=0.25, key_position="prompt_last")
    )
    try:
        with pytest.raises(EditorStateError, match="other settings"):
            other.load(tmp_path / "melo")
        old = other.state_dict()
        del old["settings"]["key_position"]
        other.load_state_dict(old)
    finally:
        other.close()


def test_a_token_near_a_subject_key_routes_only_where_the_subject_itself_ends(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Another name that shares the subject's last token can put a key within reach of
    the subject's (on SmolLM2, "Bantry Bay" reached "Prydz Bay"); the route needs the
    edit's subject n-gram to end at that token, so such a prompt stays unrouted. (A wide
    radius here: on the two-layer micro world the impostor's key is farther.)"""
    editor: MeloEditor = make_editor(key_position="subject_last", radius=1.2)
    record = world_edits[0]
    assert editor.apply([spec(record)])[0].accepted
    first, last = record["subject"].split(" ", 1)
    impostor = record["prompt"].replace(record["subject"], f"Qa {last}")
    assert first not in impostor
    keys = editor.keys.token_keys([impostor])[0]
    assert editor.index is not None
    near = [r for r in editor.index.query(keys) if r is not None]
    assert near, "the shared last token should lie within reach of the subject key"
    assert editor.route_blocks([impostor, record["prompt"]]) == [
        None,
        editor.table.block_of(record["id"]),
    ]
    with editor.routing([impostor]):
        routed = logits(loaded, [impostor])
    with route_rows([None]):
        plain = logits(loaded, [impostor])
    assert torch.equal(routed, plain)


def _same_subject_pair(world_edits: Records) -> tuple[dict[str, Any], dict[str, Any]]:
    """Edit 0, and edit 1's prompt and target asked about edit 0's subject."""
    first, other = world_edits[0], world_edits[1]
    second = {
        **other,
        "id": "same-subject",
        "prompt": other["prompt"].replace(other["subject"], first["subject"]),
        "subject": first["subject"],
    }
    assert first["subject"] in second["prompt"] and second["prompt"] != first["prompt"]
    return first, second


def _answers(editor: MeloEditor, loaded: LoadedModel, prompts: list[str]) -> list[str]:
    with editor.routing(prompts):
        return greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=4)


def test_edits_of_one_subject_share_its_block_and_each_keeps_its_answer(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """A second edit of an applied subject joins that subject's block, which is trained
    again on both: each prompt answers its own target. (Before, its subject key equalled
    the first edit's and it was refused, or it took over the subject's other facts.)
    Retracting one trains the block on the other alone: the retracted answer is gone."""
    editor = _subject_editor(make_editor)
    first, second = _same_subject_pair(world_edits)
    assert editor.apply([spec(first)])[0].accepted
    outcome = editor.apply([spec(second)])[0]
    assert outcome.accepted, outcome.reason
    block = editor.table.block_of(first["id"])
    assert editor.table.block_of(second["id"]) == block
    assert editor.table.snapshot()["blocks"] == {block: [first["id"], "same-subject"]}
    prompts = [first["prompt"], second["prompt"]]
    assert editor.route_blocks(prompts) == [block, block]
    replies = _answers(editor, loaded, prompts)
    assert continuation_matches(replies[0], first["target"]), replies
    assert continuation_matches(replies[1], second["target"]), replies
    editor.retract([first["id"]])
    assert editor.table.snapshot()["blocks"] == {block: ["same-subject"]}
    replies = _answers(editor, loaded, prompts)
    assert not continuation_matches(replies[0], first["target"]), replies
    assert continuation_matches(replies[1], second["target"]), replies


def test_a_refused_edit_of_an_applied_subject_leaves_its_block_as_it_was(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """When retraining the subject's block cannot take the new edit, the edit is refused
    and the block gets back its weights, bit for bit: the applied edit still answers."""
    from daemon.editors.melo import layer as blocks
    from daemon.editors.melo.training import TrainSettings

    editor = _subject_editor(make_editor)
    first, second = _same_subject_pair(world_edits)
    assert editor.apply([spec(first)])[0].accepted
    block = editor.table.block_of(first["id"])
    assert block is not None
    before = blocks.block_state(editor.installed, block)
    index_before = index_bytes(editor)
    editor.train_settings = TrainSettings(editor.config.learning_rate, 1)  # cannot converge
    outcome = editor.apply([spec(second)])[0]
    assert not outcome.accepted and outcome.reason is not None
    after = blocks.block_state(editor.installed, block)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert index_bytes(editor) == index_before
    assert editor.table.snapshot()["blocks"] == {block: [first["id"]]}
    assert continuation_matches(_answers(editor, loaded, [first["prompt"]])[0], first["target"])


def test_a_subject_key_is_also_read_in_fixed_frames_that_route_to_its_block(
    make_editor: Any, world_edits: Records
) -> None:
    """What precedes a subject moves its key, so each edit also stores its subject's keys
    in ``SUBJECT_FRAMES``, clustered by subject: the frames route to its block."""
    from daemon.editors.melo.editor import SUBJECT_FRAMES

    editor = _subject_editor(make_editor)
    record = world_edits[0]
    edit = spec(record)
    texts = editor.key_texts(edit)
    framed = [f.format(record["subject"]) for f in SUBJECT_FRAMES]
    assert texts == [record["prompt"], *framed]
    assert editor.apply([edit])[0].accepted
    assert editor.index is not None and editor.index.key_count == len(texts)
    block = editor.table.block_of(record["id"])
    assert editor.route_blocks(framed) == [block] * len(framed)


def test_an_edit_without_a_subject_routes_by_its_last_token_even_after_a_newline(
    make_editor: Any, world_edits: Records
) -> None:
    """A subjectless edit's key is its prompt's last token; its prompt must route there
    even when that token is whitespace (a chat prompt ends "assistant\\n"), which a
    stripped prompt's tokens would never end at."""
    editor = _subject_editor(make_editor)
    record = world_edits[0]
    prompt = record["prompt"] + "\n"
    out = editor.apply([spec(record, subject=None, prompt=prompt)])
    assert out[0].accepted, out[0].reason
    assert editor.route_blocks([prompt, record["prompt"]])[0] == out[0].details["block"]


def test_a_chat_edit_without_a_subject_keys_the_users_text_not_the_template(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Every chat prompt ends with the same template tokens; a subjectless chat-form
    edit (a behaviour) is keyed where the user's text ends, so another question in the
    same template does not reach its block."""
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </turn>"
        "{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}"
    )
    editor = _subject_editor(make_editor)
    mine, other = world_edits[0], world_edits[3]
    asked = chat_prompt(loaded.tokenizer, mine["prompt"])
    out = editor.apply([spec(mine, subject=None, prompt=asked)])
    assert out[0].accepted, out[0].reason
    elsewhere = chat_prompt(loaded.tokenizer, other["prompt"])
    head = user_text_end(asked, chat_suffix(loaded.tokenizer))
    assert head is not None and head.endswith(mine["prompt"])
    block = out[0].details["block"]
    # the key lives where the user's text ends: that text routes even without the suffix
    assert editor.route_blocks([asked, head, elsewhere]) == [block, block, None]


def _with_own_subject_probe(world_edits: Records) -> tuple[dict[str, Any], str]:
    """A record and one of its locality probes that names the record's own subject (a
    question about another relation of the same subject)."""
    for record in world_edits:
        for probe in record["locality"]:
            if record["subject"] in probe["prompt"]:
                return record, probe["prompt"]
    raise AssertionError("no world edit has a same-subject locality probe")


def test_a_prompt_reach_edit_routes_its_prompt_but_not_its_subjects_other_questions(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """Reach "prompt": keyed where the prompt ends, with ``prompt_radius``, in a block of
    its own: the prompt answers the target, another question about the same subject is
    not routed and keeps the base model's logits. The same edit with reach "subject"
    routes that question (the subject's key)."""
    editor = _subject_editor(make_editor)
    record, other = _with_own_subject_probe(world_edits)
    before = logits(loaded, [other])
    narrow = spec(record, reach="prompt")
    assert editor.key_texts(narrow) == [record["prompt"]]  # no subject frames
    out = editor.apply([narrow])
    assert out[0].accepted, out[0].reason
    block = out[0].details["block"]
    assert editor.index is not None
    assert [c.radius for c in editor.index.clusters().values()] == [
        pytest.approx(editor.config.prompt_radius)
    ]
    assert editor.route_blocks([record["prompt"], other]) == [block, None]
    with editor.routing([other]):
        torch.testing.assert_close(logits(loaded, [other]), before, rtol=0, atol=0)
    saved = index_bytes(editor)
    editor.load_state_dict(editor.state_dict())  # reach and the key's radius persist
    assert editor._specs[record["id"]].reach == "prompt"
    assert index_bytes(editor) == saved
    assert editor.route_blocks([record["prompt"], other]) == [block, None]
    editor.retract([record["id"]])
    wide = editor.apply([spec(record)])
    assert wide[0].accepted, wide[0].reason
    assert editor.route_blocks([other]) == [wide[0].details["block"]]


def test_a_prompt_reach_edit_routes_only_requests_that_name_its_subject(
    make_editor: Any, world_edits: Records
) -> None:
    """With radii that reach every unit key (1.9), the same question about ANOTHER subject
    ends within reach of the edit's key, yet is not routed: the request must name the
    subject."""
    editor = make_editor(key_position="subject_last", radius=1.9, prompt_radius=1.9)
    record = world_edits[0]
    other = next(r for r in world_edits if r["subject"] != record["subject"])
    elsewhere = record["prompt"].replace(record["subject"], other["subject"])
    out = editor.apply([spec(record, reach="prompt")])
    assert out[0].accepted, out[0].reason
    assert editor.index is not None
    end_keys = editor.keys.token_keys([elsewhere])[0]
    assert editor.index.query(end_keys[-1:])[0] is not None  # the radius alone would route
    assert editor.route_blocks([record["prompt"], elsewhere]) == [out[0].details["block"], None]


def test_a_prompt_keyed_edit_with_rephrases_reaches_half_their_spread(
    make_editor: Any, world_edits: Records
) -> None:
    """An edit keyed where its text ends reaches ``prompt_radius`` around each of its
    keys, or half the largest distance between its own phrasings' keys when the client
    sent rephrases that lie farther apart (never past the index's radius)."""
    from daemon.editors.melo.editor import spread_of

    editor = _subject_editor(make_editor)
    record = world_edits[0]
    edit = spec(record, subject=None, rephrases=True)
    texts = editor.key_texts(edit)
    assert len(texts) > 1
    spread = spread_of(list(editor.keys(texts)))
    assert spread / 2 > editor.config.prompt_radius  # the world's templates lie apart
    out = editor.apply([edit])
    assert out[0].accepted, out[0].reason
    assert editor.index is not None
    radii = {round(c.radius, 5) for c in editor.index.clusters().values()}
    assert radii == {round(min(spread / 2, editor.index.radius), 5)}
    alone = spec(world_edits[1], subject=None)
    out = editor.apply([alone])
    assert out[0].accepted, out[0].reason
    mine = [c for c in editor.index.clusters().values() if c.edit_ids == [alone.edit_id]]
    assert [c.radius for c in mine] == [pytest.approx(editor.config.prompt_radius)]


def test_a_whole_reply_target_ends_the_generation_and_a_continuation_does_not(
    make_editor: Any, loaded: LoadedModel, world_edits: Records
) -> None:
    """``whole_reply``: the block learns the target then the end-of-sequence token, so
    greedy generation stops after the target; an ordinary edit's block goes on."""
    assert loaded.tokenizer.eos_token
    editor = _subject_editor(make_editor)
    ended, going = world_edits[0], world_edits[1]
    out = editor.apply([spec(ended, whole_reply=True), spec(going)])
    assert all(o.accepted for o in out), out
    prompts = [ended["prompt"], going["prompt"]]
    with editor.routing(prompts):
        replies = greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=8)
    assert replies[0] == ended["target"]
    assert replies[1].startswith(going["target"]) and len(replies[1]) > len(going["target"])
