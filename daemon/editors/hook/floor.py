"""The subject gate's cosine floor, calibrated from the model (``gate_subject_cos_floor = "auto"``).

Pure functions: centred, normalised keys and their labels in, a floor and its
evidence out. :mod:`daemon.editors.hook.setup` reads the keys (world facts under
their training templates, the lowest hook layer, the gate's own centre) and applies
the result.

Why a floor, and why from the model
-----------------------------------
The subject gate scores a token only against the keys of edits whose subject the
input names, so its floor only has to reject the SAME subject under ANOTHER
relation: "X was born in" must not fire the edit of "X works for". Where that floor
belongs depends on the model. Measured centred cosines (hook layer 2, prompt-last
keys, centre = mean key over probe prompts) between an edit prompt's key and

- its rephrases (should fire): GPT-2 world q05/q25/q50 = .57/.82/.91,
  Llama world .51/.81/.92;
- prompts of the same subject under another relation (should not):
  GPT-2 world q50/q75/q95 = .17/.29/.48, Llama world .03/.13/.32.

At the shipped floor 0.55 the GPT-2 world opens the gate for such prompts too often
(locality .956 at 1,022 edits; floor .60: paraphrase .925 / locality .976; .65:
.916 / .991) while the Llama world is fine at 0.55.

Those cosines were centred on the mean prompt-last key. The gate centres on its own
``center``, the mean key over ALL calibration-text tokens, which leaves the component
prompt-last keys share, so its cosines are higher; this module works in the gate's
space, since that is where the floor applies. There, over the sample
:func:`daemon.editors.hook.setup.world_floor_facts` draws (layers [2, 3], prompt-last
keys, hook layer 2): same-subject, other-relation q50/q95/q99.5 = .37/.60/.72 on the
GPT-2 world, .26/.46/.60 on the small Llama world, .69 (q99.5) on the medium Llama
world. At the 0.98 quantile "auto" picks .66 / .52 / .66 (training-template pairs
pass at .970 / .984 / .879); at 0.995 it would pick .72 / .60 / .70 (.945 / .969 /
.862). 0.98 was chosen from end-to-end runs at 1,000 edits on the GPT-2 world
(fixed floors .55 / .60 / .65 / .70: paraphrase .929 / .925 / .916 / .904, locality
.956 / .976 / .991 / .997): past about .65 each step buys little locality for
a point of paraphrase.

The rule
--------
Negatives: the cosines between keys of the same subject under different relations
(every template pair). Positives: between keys of the same (subject, relation)
under different templates. The floor is the ``NEG_QUANTILE`` quantile of the
negatives, rounded UP to 0.01 and clipped to ``[FLOOR_MIN, FLOOR_MAX]``: at most
about 2% of other-relation prompts pass on the cosine alone (the gate's
per-key z rule still has to pass too). ``FLOOR_MIN`` keeps the gate from opening
for prompts that share little but the subject; ``FLOOR_MAX`` keeps most rephrases
in even for a model whose relations blur. With fewer than ``MIN_PAIRS`` negative
pairs the quantile means little: the rule gives None and the caller keeps
``DEFAULT_SUBJECT_COS_FLOOR``. The positives' pass rate at the floor is reported
as evidence of what the floor costs in paraphrase recall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

NEG_QUANTILE = 0.98
"""The share of same-subject, other-relation cosines the floor lies above."""

FLOOR_MIN = 0.40
FLOOR_MAX = 0.80
"""The calibrated floor is clipped to ``[FLOOR_MIN, FLOOR_MAX]``."""

MIN_PAIRS = 200
"""Fewer negative pairs than this: no calibrated floor (None)."""


@dataclass(frozen=True)
class FactLabel:
    """What a calibration key is the key of: a subject, a relation, a template index."""

    subject: str
    relation: str
    template: int


@dataclass(frozen=True)
class FloorEvidence:
    """A calibrated floor and what it rests on."""

    floor: float
    negative_quantile: float  # the raw NEG_QUANTILE quantile of the negatives
    negatives: int  # same subject, different relation: pairs
    positives: int  # same subject and relation, different template: pairs
    positive_pass_rate: float | None  # share of positives >= floor (None: no positives)
    negative_pass_rate: float  # share of negatives >= floor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_cosines(
    keys: torch.Tensor, labels: Sequence[FactLabel]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(negatives, positives)``: float64 cosines of the unordered key pairs of each subject.

    ``keys`` ``(n, d)``: centred, unit keys, one per label. Keys of different subjects
    are never paired (the subject gate never compares them).
    """
    if keys.dim() != 2 or keys.shape[0] != len(labels):
        raise ValueError(f"keys {tuple(keys.shape)} do not fit {len(labels)} labels")
    by_subject: dict[str, list[int]] = {}
    for n, label in enumerate(labels):
        by_subject.setdefault(label.subject, []).append(n)
    negatives: list[torch.Tensor] = []
    positives: list[torch.Tensor] = []
    k64 = keys.double()
    for rows in by_subject.values():
        if len(rows) < 2:
            continue
        cos = k64[rows] @ k64[rows].T  # (r, r)
        rel = [labels[n].relation for n in rows]
        tpl = [labels[n].template for n in rows]
        same_rel = torch.tensor([[a == b for b in rel] for a in rel], device=cos.device)
        same_tpl = torch.tensor([[a == b for b in tpl] for a in tpl], device=cos.device)
        upper = torch.ones_like(same_rel).triu(diagonal=1)
        negatives.append(cos[upper & ~same_rel])
        positives.append(cos[upper & same_rel & ~same_tpl])
    empty = k64.new_zeros(0)
    return (
        torch.cat(negatives) if negatives else empty,
        torch.cat(positives) if positives else empty,
    )


def round_up(value: float, step: float = 0.01) -> float:
    """``value`` rounded up to a multiple of ``step`` (representation noise ignored)."""
    return round(math.ceil(round(value / step, 6)) * step, 10)


def floor_rule(negatives: torch.Tensor, positives: torch.Tensor) -> FloorEvidence | None:
    """The floor of the module docstring's rule, or None below ``MIN_PAIRS`` negatives."""
    if negatives.numel() < MIN_PAIRS:
        return None
    neg = negatives.double().cpu()
    pos = positives.double().cpu()
    quantile = float(torch.quantile(neg, NEG_QUANTILE))
    floor = min(max(round_up(quantile), FLOOR_MIN), FLOOR_MAX)
    return FloorEvidence(
        floor=floor,
        negative_quantile=quantile,
        negatives=int(neg.numel()),
        positives=int(pos.numel()),
        positive_pass_rate=float((pos >= floor).double().mean()) if pos.numel() else None,
        negative_pass_rate=float((neg >= floor).double().mean()),
    )


def calibrate_floor(keys: torch.Tensor, labels: Sequence[FactLabel]) -> FloorEvidence | None:
    """The floor for centred, unit ``keys`` ``(n, d)`` of the facts ``labels`` (or None)."""
    return floor_rule(*pair_cosines(keys, labels))
