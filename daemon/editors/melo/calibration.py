"""The routing radius: chosen once per model and key layer, from a fixed bank of prompts.

Rule (``radius = 0`` in the config; a positive configured radius always wins):

1. The bank is the ``calibration_prompts`` the editor was given (a deployment
   passes its drift-probe prompts: prompts the edits must leave alone), topped
   up to ``BANK_SIZE`` with prompts sampled from the model itself when fewer
   were given. Sampled prompts are the model's own sentences (seeded, sampled
   from the start token) cut before their last word, so they look like the
   fact-completion prompts edits arrive as, for any model and with no data.
   More than ``BANK_SIZE`` given prompts are subsampled deterministically.
2. The radius is ``fraction`` times the median distance from each bank key to
   its nearest other bank key (``calibrate_radius``).

The bank has a FIXED size because nearest-neighbour distances shrink as a set
grows; a radius taken from "the edit prompts seen so far" would depend on how
many arrived in the first batch (one, with batch size 1). Edit prompts are not
used: the radius must not depend on which edits came first.

Model-sampled prompts stand in for real ones: their nearest-neighbour distances
are close to those of probe and edit prompts. A larger fraction routes more
unsent rephrases to their edit but leaves fewer unrelated prompts unrouted; no
fraction gives both. ``DEFAULT_FRACTION`` keeps unrelated prompts unchanged, and
paraphrases are reached by sending rephrases (indexed and trained with the edit).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import structlog
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.editors.melo.index import pairwise_sq
from daemon.model.generate import SENTENCE_ENDS

BANK_SIZE = 256
DEFAULT_FRACTION = 0.5
SAMPLE_TOKENS = 24
MIN_WORDS = 3

log = structlog.get_logger()


def prompt_from_text(text: str) -> str | None:
    """``text``'s first sentence without its last word, or None when under MIN_WORDS words."""
    cut = len(text)
    for end in SENTENCE_ENDS:
        pos = text.find(end)
        if pos != -1:
            cut = min(cut, pos)
    words = text[:cut].split()
    if len(words) < MIN_WORDS:
        return None
    return " ".join(words[:-1])


@torch.no_grad()
def sample_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    *,
    seed: int = 0,
    max_new_tokens: int = SAMPLE_TOKENS,
) -> list[str]:
    """Up to ``n`` distinct prompts cut from sentences the model samples (deterministic)."""
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to sample from")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    device = next(model.parameters()).device
    ids = torch.full((2 * n, 1), int(start), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(  # type: ignore[operator]  # transformers' untyped mixin
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    prompts = [p for p in (prompt_from_text(t) for t in texts) if p]
    return list(dict.fromkeys(prompts))[:n]


def calibration_bank(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    given: Sequence[str],
    *,
    size: int = BANK_SIZE,
    seed: int = 0,
) -> list[str]:
    """The bank of rule 1: given prompts (subsampled to ``size``), topped up by sampling."""
    distinct = list(dict.fromkeys(p for p in given if p.strip()))
    if len(distinct) > size:
        distinct = random.Random(seed).sample(distinct, size)
    if len(distinct) < size:
        sampled = sample_prompts(model, tokenizer, size, seed=seed)
        seen = set(distinct)
        distinct.extend(p for p in sampled if p not in seen)
        distinct = distinct[:size]
    return distinct


def calibrate_radius(
    keys: npt.ArrayLike,
    *,
    groups: npt.ArrayLike | None = None,
    quantile: float = 0.5,
    fraction: float = 0.5,
) -> float:
    """A radius for ``keys`` of one model and layer, by the rule below (pure function).

    For every key, take the L2 distance to the nearest key of a *different* group
    (``groups`` labels keys of the same fact, e.g. a prompt and its rephrasings;
    without it every key is its own group). The radius is ``fraction`` times the
    ``quantile`` of those distances. With ``fraction = 0.5`` two distinct facts at
    the typical nearest distance get balls that touch but do not overlap; rephrases
    closer than that to their fact's key still fall inside.
    """
    x = np.asarray(keys, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"calibrate_radius needs (N >= 2, d) keys, got shape {x.shape}")
    labels = np.arange(len(x)) if groups is None else np.asarray(groups)
    if labels.shape != (len(x),):
        raise ValueError(f"groups has {labels.shape} labels for {len(x)} keys")
    if len(np.unique(labels)) < 2:
        raise ValueError("calibrate_radius needs keys of at least two distinct groups")
    if not (0.0 <= quantile <= 1.0 and fraction > 0.0):
        raise ValueError(f"need 0 <= quantile <= 1 and fraction > 0, got {quantile}, {fraction}")
    nearest = np.empty(len(x))
    for start in range(0, len(x), 1024):  # (chunk, N) distance rows at a time
        rows = slice(start, start + 1024)
        sq = pairwise_sq(x[rows], x)
        sq[labels[rows, None] == labels[None, :]] = np.inf
        nearest[rows] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    return float(fraction * np.quantile(nearest, quantile))


def radius_from_keys(keys: npt.ArrayLike, fraction: float = DEFAULT_FRACTION) -> float:
    """Rule 2: ``fraction`` x the median nearest-other-key distance (plain L2)."""
    arr = np.asarray(keys, dtype=np.float64)
    radius = calibrate_radius(arr, quantile=0.5, fraction=fraction)
    if not radius > 0.0:
        raise ValueError(f"calibrated radius is {radius}: the bank holds identical keys")
    return radius
