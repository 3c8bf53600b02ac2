"""MELO keys: last real prompt token, padding-invariant, unit norm, never routed; the
prompt-key table, a Mapping over one growable matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.editors.melo.config import MeloConfig
from daemon.editors.melo.editor import MeloEditor
from daemon.editors.melo.keys import KeyReader, KeyTable
from daemon.editors.melo.routing import route_rows
from daemon.model import arch
from daemon.model.loading import LoadedModel
from tests.daemon.editors.melo.helpers import RADIUS, logits, spec
from tests.daemon.model.conftest import build_bos_tokenizer, tiny_gpt2

PROMPTS = ["The capital of", "A", "Who is the chief executive officer of the company"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_keys_are_the_same_alone_and_in_a_padded_batch(side: str) -> None:
    """Absolute positions (GPT-2): a short prompt padded next to a longer one keeps its key."""
    tokenizer = build_bos_tokenizer()
    tokenizer.padding_side = side
    model = tiny_gpt2(vocab_size=len(tokenizer), n_layer=3)
    reader = KeyReader(model, tokenizer, 1)
    try:
        short, long = "Jane Roe", "The chief executive of Acme Corporation is Jane Roe"
        assert tokenizer([short, long], padding=True)["attention_mask"][0].count(0) > 3
        alone = reader([short])
        np.testing.assert_allclose(reader([short, long])[0], alone[0], atol=1e-5)
        np.testing.assert_allclose(reader([long, short])[1], alone[0], atol=1e-5)
    finally:
        reader.close()


def test_keys_are_unit_norm_and_the_same_batched_or_alone(loaded: LoadedModel) -> None:
    """A padded batch gives each prompt the key it gets alone (float tolerance), norm 1."""
    reader = KeyReader(loaded.model, loaded.tokenizer, 0)
    try:
        batched = reader(PROMPTS)
        alone = np.concatenate([reader([p]) for p in PROMPTS])
        assert batched.dtype == np.float32 and batched.shape == (3, arch.hidden_size(loaded.model))
        np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(batched, alone, atol=1e-5)
        assert reader([]).shape == (0, batched.shape[1])
    finally:
        reader.close()


def test_key_is_the_block_output_at_the_last_prompt_token(loaded: LoadedModel) -> None:
    """The key equals the normalised hidden state of block k at the prompt's last token."""
    reader = KeyReader(loaded.model, loaded.tokenizer, 0)
    try:
        enc = loaded.tokenizer([PROMPTS[0]], return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model(**enc, output_hidden_states=True).hidden_states[1][0, -1]
        want = (hidden / hidden.norm()).numpy()
        np.testing.assert_allclose(reader([PROMPTS[0]])[0], want, atol=1e-5)
    finally:
        reader.close()


def test_capture_hook_leaves_ordinary_forwards_whole(
    loaded: LoadedModel, base: LoadedModel
) -> None:
    """Outside a key computation the installed hook does nothing: full, identical logits."""
    reader = KeyReader(loaded.model, loaded.tokenizer, 0)
    try:
        reader(PROMPTS)
        assert torch.equal(logits(loaded, PROMPTS), logits(base, PROMPTS))
    finally:
        reader.close()


def test_keys_do_not_depend_on_edits_or_outer_routes(
    loaded: LoadedModel, world_edits: list[dict[str, object]]
) -> None:
    """Keys are computed on the base model: the same before and after edits, in any context."""
    editor = MeloEditor(
        loaded.model, loaded.tokenizer, MeloConfig(radius=RADIUS, key_position="prompt_last")
    )
    try:
        prompts = [str(r["prompt"]) for r in world_edits[:2]]
        before = editor.keys(prompts)
        editor.apply([spec(r) for r in world_edits[:2]])
        block = editor.table.block_of(str(world_edits[0]["id"]))
        with route_rows([block, block]):
            inside = editor.keys(prompts)
        assert np.array_equal(before, editor.keys(prompts))
        assert np.array_equal(before, inside)
    finally:
        editor.close()


def test_rows_follow_adds_and_removals_past_a_regrowth() -> None:
    """Every id maps to its key after 100 adds (buffer doubled) and swap-removals."""
    rng = np.random.default_rng(0)
    table = KeyTable(3)
    want = {f"e{i}": rng.normal(size=3).astype(np.float32) for i in range(100)}
    for edit_id, key in want.items():
        table[edit_id] = key
    for edit_id in ("e0", "e50", "e99"):
        del table[edit_id]
        del want[edit_id]
    assert len(table) == len(want) and set(table) == set(want)
    for edit_id, key in want.items():
        assert np.array_equal(table[edit_id], key)
    rows = dict(zip(table.ids(), table.matrix(), strict=True))
    assert all(np.array_equal(rows[e], k) for e, k in want.items())
