"""A model's chat template: wrapping a user's text the way the model was tuned to see it."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template (instruction-tuned models do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """``user_text`` as one user turn, ending where the assistant's reply begins.

    The text is to be tokenized as it is: a BOS token that the template writes
    and the tokenizer would add again is removed from the front.
    """
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    text = str(rendered)
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and isinstance(bos, str) and text.startswith(bos):
        text = text[len(bos) :]
    return text
