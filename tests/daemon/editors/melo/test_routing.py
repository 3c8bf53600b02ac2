"""Routing decided inside the request's own prefill: same routes, one pass through the key layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch

from daemon.editors.melo.editor import MeloEditor
from daemon.editors.melo.routing import RowRoutes, _prompt_ends, current_routes, route_rows
from daemon.model import arch
from daemon.model.batches import encode_prompt_target
from daemon.model.generate import greedy_continuations
from daemon.model.loading import LoadedModel
from tests.daemon.editors.melo.helpers import spec

Records = list[dict[str, Any]]
NEW_TOKENS = 4


@pytest.fixture
def edited(make_editor: Any, world_edits: Records) -> MeloEditor:
    """An editor with three edits applied (rephrases trained in)."""
    editor: MeloEditor = make_editor()
    outcomes = editor.apply([spec(r, rephrases=True) for r in world_edits[:3]])
    assert all(o.accepted for o in outcomes)
    return editor


def _mixed_prompts(records: Records) -> list[str]:
    """Edit prompts, rephrases and locality prompts: some routed, some not."""
    prompts = [r["prompt"] for r in records[:3]]
    prompts += [p for r in records[:3] for p in r["rephrases"][:1]]
    prompts += [p["prompt"] for r in records[:3] for p in r["locality"][:2]]
    return prompts


@contextmanager
def _seen_routes(editor: MeloEditor) -> Iterator[list[RowRoutes | None]]:
    """The routes each forward of the (first) LoRA layer read."""
    seen: list[RowRoutes | None] = []
    layer = next(iter(editor.installed.values()))
    handle = layer.register_forward_hook(lambda *_: seen.append(current_routes()))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def _key_layer_calls(editor: MeloEditor) -> Iterator[list[int]]:
    """The sequence length of each forward through the key layer's block."""
    calls: list[int] = []
    block = arch.layer_block(editor.model, editor.key_layer)

    def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append(int(hidden.shape[1]))

    handle = block.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def test_prefill_routes_equal_up_front_routes_and_generate_the_same_text(
    edited: MeloEditor, loaded: LoadedModel, world_edits: Records
) -> None:
    """The routes the prefill decides are route_blocks' routes, frozen for every decode step."""
    prompts = _mixed_prompts(world_edits)
    expected = edited.route_blocks(prompts)
    assert any(b is not None for b in expected) and any(b is None for b in expected)
    with route_rows(expected):
        up_front = greedy_continuations(
            loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW_TOKENS
        )
    with _seen_routes(edited) as seen, edited.routing(prompts):
        inline = greedy_continuations(
            loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW_TOKENS
        )
    assert inline == up_front
    assert seen == [tuple(expected)] * NEW_TOKENS


def test_one_pass_through_the_key_layer_per_prefill(
    edited: MeloEditor, loaded: LoadedModel, world_edits: Records
) -> None:
    """Generation runs the key layer once per token: no separate key forward before the prefill."""
    prompts = _mixed_prompts(world_edits)
    with _key_layer_calls(edited) as calls, edited.routing(prompts):
        greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW_TOKENS)
    assert len(calls) == NEW_TOKENS
    assert calls[0] > 1 and calls[1:] == [1] * (NEW_TOKENS - 1)


def test_a_batch_in_another_layout_is_routed_up_front(
    edited: MeloEditor, loaded: LoadedModel, world_edits: Records
) -> None:
    """Left-padded prompt + target without position ids: keys computed up front, same routes."""
    prompts = _mixed_prompts(world_edits)
    targets = [" x"] * len(prompts)
    batch = encode_prompt_target(loaded.tokenizer, prompts, targets)
    model = cast(Any, loaded.model)
    routed = edited.routing(prompts)
    with _seen_routes(edited) as seen, _key_layer_calls(edited) as calls, torch.no_grad(), routed:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert seen == [tuple(edited.route_blocks(prompts))]
    assert len(calls) == 2  # the up-front key forward, then the real one


def test_empty_index_routes_every_row_to_the_base_model(
    make_editor: Any, loaded: LoadedModel
) -> None:
    """Before any edit no key is computed at all: all rows run the base model."""
    editor: MeloEditor = make_editor()
    prompts = ["The capital of France is", "Hi"]
    with _seen_routes(editor) as seen, _key_layer_calls(editor) as calls, editor.routing(prompts):
        greedy_continuations(loaded.model, loaded.tokenizer, prompts, max_new_tokens=2)
    assert seen == [(None, None)] * 2 and len(calls) == 2


def test_prompt_ends_need_the_prompt_at_the_first_real_token_with_positions_from_zero() -> None:
    """Left or right padding, prompt + target: found; other tokens or positions: None."""
    prompts = [[5, 6, 7], [8]]
    left_ids, left_mask = [[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]]
    left = _prompt_ends(prompts, left_ids, left_mask, [[0, 1, 2], [1, 1, 0]])
    assert left is not None and left.tolist() == [2, 2]
    right_ids, right_mask = [[5, 6, 7, 9], [8, 9, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 0]]
    right = _prompt_ends(prompts, right_ids, right_mask, [[0, 1, 2, 3], [0, 1, 1, 1]])
    assert right is not None and right.tolist() == [2, 0]
    other_token = [[5, 6, 7], [0, 0, 9]]
    assert _prompt_ends(prompts, other_token, left_mask, [[0, 1, 2], [1, 1, 0]]) is None
    no_position_ids = [[0, 1, 2], [0, 1, 2]]  # row 1's prompt would sit at position 2
    assert _prompt_ends(prompts, left_ids, left_mask, no_position_ids) is None
