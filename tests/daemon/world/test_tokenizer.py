"""The world tokenizer round-trips text, maps offsets, and survives save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from daemon.world.facts import WORLD_SPECS, World, generate_world
from daemon.world.tokenizer import gpt2_tokenizer, token_length, train_bpe_tokenizer


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(WORLD_SPECS["micro"], seed=0)


@pytest.fixture(scope="module")
def tokenizer(world: World) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(world.training_corpus(), vocab_size=768)


def test_vocabulary_size_is_bounded(tokenizer: PreTrainedTokenizerFast) -> None:
    assert 300 < len(tokenizer) <= 768


def test_encoding_starts_with_bos_and_decodes_back(
    tokenizer: PreTrainedTokenizerFast, world: World
) -> None:
    for sentence in [*world.training_corpus()[:50], "Unseen wörds: ünïcode & 123!"]:
        ids = tokenizer(sentence)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_offsets_map_tokens_to_the_text(tokenizer: PreTrainedTokenizerFast, world: World) -> None:
    """Offsets cover the text exactly; the bos token maps to an empty span."""
    prompt, target = world.training_examples()[7]
    text = prompt + target
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert offsets[0] == (0, 0)
    assert "".join(text[a:b] for a, b in offsets[1:]) == text
    subject = world.facts[1].subject
    start, end = text.find(subject), text.find(subject) + len(subject)
    # byte-level BPE: a word's first token carries the space before it
    assert any(a <= start < b for a, b in offsets[1:])
    assert any(b == end for _, b in offsets[1:])


def test_names_take_a_few_tokens(tokenizer: PreTrainedTokenizerFast, world: World) -> None:
    lengths = [token_length(tokenizer, " " + f.object) for f in world.facts]
    assert max(lengths) <= 8
    assert 1.0 < sum(lengths) / len(lengths) < 5.0


def test_prompt_and_target_split_on_a_token_boundary(
    tokenizer: PreTrainedTokenizerFast, world: World
) -> None:
    for prompt, target in world.training_examples() + world.heldout_examples():
        head = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + target)["input_ids"][: len(head)] == head


def test_saved_tokenizer_loads_with_auto_tokenizer(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, world: World
) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    sentence = world.training_corpus()[3]
    assert loaded(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]


def test_real_gpt2_vocabulary(gpt2_tokenizer_dir: Path) -> None:
    tok = gpt2_tokenizer(gpt2_tokenizer_dir)
    assert len(tok) == 50257
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.eos_token_id == tok.pad_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [6342]
