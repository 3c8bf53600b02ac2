"""The chat template's parts: where a one-turn chat prompt's user text ends."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from daemon.model.chat import chat_prompt, chat_suffix, user_text_end

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_the_suffix_and_the_user_texts_end(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert chat_suffix(tok) is None  # no template: no chat prompts
    assert user_text_end("Who are you?", None) is None
    tok.chat_template = TEMPLATE
    suffix = chat_suffix(tok)
    assert suffix == "<|end|>\n<|assistant|>\n"
    prompt = chat_prompt(tok, "Who are you?\n")
    assert user_text_end(prompt, suffix) == "<|user|>\nWho are you?\n"
    assert user_text_end("Who are you?", suffix) is None  # not a chat prompt
    assert user_text_end(suffix, suffix) is None  # nothing before it
