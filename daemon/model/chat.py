"""A model's chat template: a conversation rendered the way the model was tuned to see it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from daemon.errors import ChatTemplateError


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
    return render_chat(tokenizer, [{"role": "user", "content": user_text}])


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    template: str | None = None,
) -> str:
    """``messages`` (``{"role", "content"}`` each) rendered by ``template`` (a Jinja chat
    template), else by the tokenizer's own, ending where the assistant's reply begins.

    As :func:`chat_prompt`, the text is to be tokenized as it is (a BOS the template
    writes and the tokenizer would add again is removed). Raises
    :class:`ChatTemplateError` when there is no template, or when the template refuses
    the conversation (many raise on roles out of order).
    """
    if template is None and not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "the model has no chat template; name one in [api] chat_template "
            "(a Jinja template or a file holding one)"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except (TemplateError, ValueError, TypeError) as exc:  # a template's raise_exception() too
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from exc
    return _without_repeated_bos(tokenizer, str(rendered))


def _without_repeated_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and isinstance(bos, str) and text.startswith(bos):
        return text[len(bos) :]
    return text


_MARKER = "\u2063editd-user-turn\u2063"  # invisible separators: never in real text


def chat_suffix(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """What a one-turn chat prompt (:func:`chat_prompt`) ends with after the user's
    text: the end of the turn and the assistant's header (SmolLM2:
    ``"<|im_end|>\\n<|im_start|>assistant\\n"``); None without a chat template."""
    if not has_chat_template(tokenizer):
        return None
    rendered = chat_prompt(tokenizer, _MARKER)
    at = rendered.rfind(_MARKER)
    if at < 0:
        return None
    return rendered[at + len(_MARKER) :] or None


def user_text_end(prompt: str, suffix: str | None) -> str | None:
    """``prompt`` up to the end of its user's text when it is a chat prompt ending with
    ``suffix`` (:func:`chat_suffix`), else None."""
    if suffix is None or not prompt.endswith(suffix) or len(prompt) == len(suffix):
        return None
    head = prompt[: -len(suffix)]
    return head if head.strip() else None
