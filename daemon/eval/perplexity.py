"""General ability: perplexity on held-out text, with the editor's routing as it serves.

An edit that damages the model shows first in text that has nothing to do with it.
:func:`perplexity` is the token-weighted mean negative log-likelihood of every
real token after the first of each text (truncated to ``max_length`` tokens), up
to a token budget, exponentiated. Batches are left-padded with position ids from
the mask, and each forward runs inside ``editor.routing(texts)``, so MELO routes a
text as it would route that prompt. :func:`heldout_texts` gives the default text
for a model that is not a fact world: 303 Wikipedia biographies shipped in
``daemon/data`` (see its NOTICE.md), none of them in the hook's key-statistics text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.base import Editor
from daemon.model.batches import left_pad, padded_forward_inputs, padding_id

HELDOUT_FILE = "wikibio-heldout.jsonl"
DEFAULT_TOKENS = 8192


def heldout_texts() -> list[str]:
    """The shipped held-out passages."""
    data = (resources.files("daemon") / "data" / HELDOUT_FILE).read_text("utf-8")
    return [json.loads(line)["text"] for line in data.splitlines() if line]


@torch.no_grad()
def perplexity(
    editor: Editor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = DEFAULT_TOKENS,
    max_length: int = 256,
    batch_size: int = 2,
) -> float:
    """exp(mean NLL) over the predicted tokens of ``texts`` (the first ``max_tokens``).

    Small batches: a batch's logits span the whole vocabulary (2 x 256 x 49,152 floats,
    100 MB, for SmolLM2), and they would set the evaluation's peak memory.
    """
    if max_tokens < 1 or not texts:
        raise ValueError("perplexity needs texts and max_tokens >= 1")
    device = next(model.parameters()).device
    total_nll, counted = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        ids, mask = left_pad([list(x) for x in enc], padding_id(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        with editor.routing(chunk):
            logits = model(**padded_forward_inputs(ids, mask), use_cache=False).logits
        real = (mask[:, 1:] * mask[:, :-1]).bool()  # a real token predicted from a real one
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1][real].float(), ids[:, 1:][real], reduction="none"
        )
        take = min(int(nll.numel()), max_tokens - counted)
        total_nll += float(nll[:take].double().sum())
        counted += take
        if counted >= max_tokens:
            break
    if counted == 0:
        raise ValueError("the texts hold no token to predict")
    return math.exp(total_nll / counted)
