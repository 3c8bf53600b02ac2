"""The hook's gate: which stored key (and so which shard) a token belongs to.

Pure functions, the subject scope and one cache of derived tensors;
``HookedProjection`` (:mod:`daemon.editors.hook.layer`) owns the buffers and calls
them. In this module, in order: the key gate (a token against every stored key),
the subject scope (which edits are candidates for which tokens of a request), the
subject gate (a token against its candidates only) and the subject gate's floor,
calibrated from the model. The measurements behind the defaults are in
BENCHMARKS.md.

Key gate
--------
The hook stores the keys of its edits, ``keys`` ``(m, d_in)`` fp32 (one row per key
site; rows can be removed for retraction). For a token with key ``x`` and stored key
``k_j`` the score is the *centred* cosine similarity::

    c_j(x) = cos(x - mu, k_j - mu)

where ``mu`` (``center``) is the mean key of non-edit text: centring removes the
component every MLP activation shares, which otherwise makes all cosines large.
Each key has its **own** reference: the mean and standard deviation of ``c_j`` over
the calibration tokens (``key_mean``, ``key_std``, persisted). Key ``j`` is eligible
for ``x`` where::

    (c_j(x) - key_mean_j) / key_std_j >= max(threshold, threshold_floor)
    and c_j(x) >= cos_floor

and the gate routes ``x`` to the shard of the eligible key with the largest cosine.
A per-key reference does not move when other keys are added or removed, so the gate
on an early edit is the same after a thousand later edits (a reference pooled over
all keys, ``max_j c_j`` of non-edit tokens, rose with every key until the edits'
own prompts fell below it). The cosine floor keeps prompts that merely share an
edit's template (other subject, same words) out; a higher floor trades paraphrase
recall for locality.

Cost: the normalised centred keys ``(m, d_in)`` are cached and rebuilt only when the
keys, the centre, the references or the thresholds change, not per forward. On a CPU
with bf16 dot products (AVX512-BF16) a bf16 pre-filter scores every token against
every key, the key's threshold folded in as one more column, and keeps the (token,
key) pairs within ``PREFILTER_MARGIN`` of the threshold; the float32 cosines and the
rule above then run on those tokens and keys alone, so the routing is the one the
float32 scores give. The margin covers bf16 rounding: unit vectors rounded to bf16
(relative error ``2**-8`` per entry) move a cosine by at most ``2**-7 + 2**-16``
(Cauchy-Schwarz), the threshold column by ``2**-9``, fp32 accumulation by ~1e-4, and
rounding the result keeps its sign: about .010 in all against a margin of .03.
Deltas are applied to the routed tokens only, one matmul per shard.

Subject scope
-------------
Every hook edit has a subject, and every rephrasing of the edit names that subject,
while most prompts the edit must leave alone do not. The subject gate therefore
asks two questions per token:

1. **Subject presence**: an edit is a *candidate* for a token only if one of the
   edit's subject token n-grams occurs in the sequence and ends at or before that
   token (causal, like the key itself). An edit's n-grams
   (:func:`daemon.model.tokens.subject_grams`) are the subject tokenised alone, with
   a leading space (BPE tokenises ``" Acme"`` and ``"Acme"`` differently) and as it
   appears in the edit's own prompt (from character offsets). A
   :class:`SubjectIndex` maps first token -> n-gram length -> n-gram -> edits, so
   matching a sequence costs O(tokens x distinct lengths), not O(edits).
2. **Key similarity among the candidates only** (:func:`route_table`): the token's
   key is scored against the candidate edits' keys alone, with their own z-score
   references and a cosine floor of its own.

:class:`SubjectScope` computes the candidates inside the request's own forward: a
forward pre-hook on the model reads ``input_ids`` and ``attention_mask`` at the
prefill (no earlier tokens: :func:`daemon.model.kv_cache.is_prefill`) and stores a
:class:`Scope` in a context variable for the hook layers of that forward; the
KV-cached decode steps that follow keep the prefill's candidates (all of them active
for the generated tokens), so scope is decided on the prompt and kept for what the
model generates. A subject that appears only in generated text therefore opens no
edit in cached decoding, whereas an uncached forward over the prompt plus that text
would see it.

Each forward's scope sits in a per-forward step that also carries the routing
decision of the first hook layer, for hooks that share it (``share_route``).

Where no scope is available (``inputs_embeds`` only, a KV cache filled outside a
prefill the tracker saw, another batch size) the hook falls back to the key gate.
Nothing here is persisted: the index is rebuilt from the editor's records (their
subjects and prompts) and the owner of every gate key row.

Subject gate
------------
With a subject scope a token is scored only against the keys of the edits whose
subject occurs in its sequence up to it, with the same z rule and a lower floor
(``DEFAULT_SUBJECT_COS_FLOOR``): other subjects' keys are never candidates, so the
floor only has to reject the same subject under another relation, and a prompt that
names no edited subject never opens the gate. Key ``j`` fires for a token with
centred unit key ``x`` where::

    cos(x, k_j) > reach_j = max(key_mean_j + z * key_std_j, subject_cos_floor)

(the key gate's z rule with the subject gate's own floor, folded into one threshold
per key; NaN references never fire), and among the firing candidates the largest
cosine wins (the lowest candidate column on ties).

Cost: everything that depends only on the request's candidates and the layer's
keys (the gathered unit keys, their thresholds, shards and, with snapping, their
values ``keys[j] @ delta[shard_j].T``) is a :class:`CandidateTable`, built once per
request and layer and reused at every KV-cached decode step; a forward then costs
one batched matmul against each row's few candidate keys. A request without any
candidate costs nothing; a decode step reuses the table of its prefill.

Subject gate floor
------------------
The subject gate's floor has to reject the SAME subject under ANOTHER relation:
"X was born in" must not fire the edit of "X works for". Where that floor belongs
depends on the model (how close a subject's keys under different relations lie
differs from model to model), so ``gate_subject_cos_floor = "auto"`` calibrates it
from the model's own keys. The calibration works in the gate's space, centred on
the gate's ``center`` (the mean key over ALL calibration-text tokens), since that
is where the floor applies. Its functions are pure: centred, normalised keys and
their labels in, a floor and its evidence out; :mod:`daemon.editors.hook.setup`
reads the keys (world facts under their training templates, the lowest hook layer,
the gate's own centre) and applies the result.

The rule: negatives are the cosines between keys of the same subject under
different relations (every template pair); positives are those between keys of the
same (subject, relation) under different templates. The floor is the
``NEG_QUANTILE`` quantile of the negatives, rounded UP to 0.01 and clipped to
``[FLOOR_MIN, FLOOR_MAX]``: at most about 2% of other-relation prompts pass on the
cosine alone (the gate's per-key z rule still has to pass too). ``FLOOR_MIN`` keeps
the gate from opening for prompts that share little but the subject; ``FLOOR_MAX``
keeps most rephrases in even for a model whose relations blur. With fewer than
``MIN_PAIRS`` negative pairs the quantile means little: the rule gives None and the
caller keeps ``DEFAULT_SUBJECT_COS_FLOOR``. The positives' pass rate at the floor is
reported as evidence of what the floor costs in paraphrase recall.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedTokenizerBase

from daemon.model.kv_cache import is_prefill
from daemon.model.tokens import TokenGram, subject_grams

DEFAULT_THRESHOLD = 3.0
"""Default z-score threshold of the scope gate (against each key's own reference)."""

DEFAULT_THRESHOLD_FLOOR = 2.0
"""The z threshold never goes below this, whatever an adaptive update asks for."""

DEFAULT_COS_FLOOR = 0.7
"""A key fires only where its centred cosine reaches this, whatever its z-score."""

DEFAULT_SUBJECT_COS_FLOOR = 0.55
"""The cosine floor of the subject gate, among the candidate edits' keys only."""

_STD_EPS = 1e-6
PREFILTER_MARGIN = 0.03  # above the bf16 error bound of the module docstring
_PREFILTER_MIN_KEYS = 64  # below this many keys the float32 scores are cheap enough
_NEVER = 4.0  # a threshold no cosine reaches (keys without a reference)


# --- the key gate ---------------------------------------------------------------------


def key_reference(
    tokens: torch.Tensor, keys: torch.Tensor, center: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key mean and std of the centred cosine of ``tokens`` ``(N, d)`` to ``keys`` ``(m, d)``.

    Pure function; float64 accumulation, float32 results ``(m,)`` each.
    """
    tn = nn.functional.normalize(tokens.double() - center.double(), dim=-1)  # (N, d)
    kn = nn.functional.normalize(keys.double() - center.double(), dim=-1)  # (m, d)
    cos = tn @ kn.T  # (N, m)
    mean = cos.mean(dim=0)
    std = cos.var(dim=0, unbiased=False).clamp(min=0).sqrt().clamp(min=_STD_EPS)
    return mean.float(), std.float()


def bf16_dot_products(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (fp32 accumulation)."""
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if callable(probe) else False


def tensor_stamp(t: torch.Tensor) -> tuple[int, int]:
    """Identity and in-place version of a tensor (version -1 where it cannot be read)."""
    try:
        version = int(getattr(t, "_version", -1))
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return id(t), version


class GateCache:
    """What the gate derives from the keys and thresholds; the hook rebuilds it only when
    ``stamp`` (identities, in-place versions and threshold values) changes."""

    def __init__(
        self,
        stamp: tuple[Any, ...],
        keys: torch.Tensor,
        center: torch.Tensor,
        key_mean: torch.Tensor,
        key_std: torch.Tensor,
        limit: float,
        cos_floor: float,
    ) -> None:
        self.stamp = stamp
        self.sources: tuple[torch.Tensor, ...] = (keys, center, key_mean, key_std)  # kept alive
        self.limit = limit
        self.cos_floor = cos_floor
        self.keys_n = nn.functional.normalize(keys - center, dim=-1)  # (m, d)
        reach = torch.maximum(
            key_mean.double() + limit * key_std.double(),
            torch.tensor(cos_floor, dtype=torch.float64, device=keys.device),
        )  # (m,): the least cosine at which each key is eligible; NaN: never
        reach = torch.nan_to_num(reach, nan=_NEVER).clamp(max=_NEVER)
        self.any_reachable = bool((reach <= 1.0 + 1e-4).any())  # float32 cosines reach 1 + eps
        self.prefilter: torch.Tensor | None = None  # (m, d + 1) bf16: [key, -threshold]
        if keys.shape[0] >= _PREFILTER_MIN_KEYS and bf16_dot_products(keys.device):
            shifted = (-(reach - PREFILTER_MARGIN)).to(self.keys_n.dtype).unsqueeze(1)
            self.prefilter = torch.cat([self.keys_n, shifted], dim=1).to(torch.bfloat16)


def decide(
    xn: torch.Tensor,
    keys_n: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    shard: torch.Tensor,
    limit: float,
    cos_floor: float,
) -> torch.Tensor:
    """Shard per unit token key ``(n, d)`` from its float32 cosines to ``keys_n`` (-1: closed).

    Pure function. The eligible key with the largest cosine wins, the lowest key index
    among equal cosines (``argmax``'s first); NaN references never make a key eligible.
    """
    cos = xn @ keys_n.T  # (n, c)
    eligible = ((cos - mean) / std >= limit) & (cos >= cos_floor)
    best, nearest = torch.where(eligible, cos, torch.full_like(cos, float("-inf"))).max(dim=-1)
    return torch.where(torch.isfinite(best), shard[nearest], torch.full_like(nearest, -1))


def route_tokens(
    xn: torch.Tensor,
    cache: GateCache,
    key_mean: torch.Tensor,
    key_std: torch.Tensor,
    key_shard: torch.Tensor,
) -> torch.Tensor:
    """Shard per centred unit token key ``xn`` ``(N, d)`` (-1: closed), through the bf16
    pre-filter when the cache has one: the exact rule then runs only on the tokens and
    keys within the margin, and decides exactly as on all of them."""
    closed = torch.full((xn.shape[0],), -1, dtype=torch.long, device=xn.device)
    if cache.prefilter is None:
        return decide(xn, cache.keys_n, key_mean, key_std, key_shard, cache.limit, cache.cos_floor)
    pad = nn.functional.pad(xn, (0, 1), value=1.0).to(torch.bfloat16)  # (N, d + 1)
    near = pad @ cache.prefilter.T  # (N, m): bf16 cosine minus (threshold - margin)
    rows = (near.amax(dim=-1) >= 0).nonzero().squeeze(1)  # tokens near some key
    if rows.numel() == 0:
        return closed
    if rows.numel() < near.shape[0]:
        near = near.index_select(0, rows)
    cols = (near.amax(dim=0) >= 0).nonzero().squeeze(1)  # keys near any of those tokens
    decided = decide(
        xn.index_select(0, rows),
        cache.keys_n.index_select(0, cols),
        key_mean[cols],
        key_std[cols],
        key_shard[cols],
        cache.limit,
        cache.cos_floor,
    )
    return closed.index_copy(0, rows, decided)


# --- the subject scope ----------------------------------------------------------------


class SubjectIndex:
    """First token -> n-gram length -> n-gram -> edit ids (an immutable snapshot)."""

    def __init__(self, grams_of: Mapping[str, frozenset[TokenGram]]) -> None:
        table: dict[int, dict[int, dict[TokenGram, list[str]]]] = {}
        for edit_id, grams in grams_of.items():
            for gram in sorted(grams):
                table.setdefault(gram[0], {}).setdefault(len(gram), {}).setdefault(gram, []).append(
                    edit_id
                )
        self._table = table
        self.first_tokens = torch.tensor(sorted(table), dtype=torch.long)

    def __len__(self) -> int:
        return len(self._table)

    def matches_at(self, row: Sequence[int], start: int) -> list[tuple[str, int]]:
        """``(edit id, last position)`` of every n-gram that starts at ``row[start]``
        (callers write pads as -1, which no n-gram holds)."""
        found: list[tuple[str, int]] = []
        for length, grams in self._table.get(row[start], {}).items():
            stop = start + length
            if stop <= len(row):
                found.extend(
                    (edit_id, stop - 1) for edit_id in grams.get(tuple(row[start:stop]), ())
                )
        return found


@dataclass(frozen=True)
class Scope:
    """The candidate gate keys of each row of one request, decided at its prefill.

    ``candidates[b, j]`` is a gate key row (-1: padding) and ``active_from[b, j]`` the
    first column of the prefill at which it is a candidate (where its subject ends).
    During the prefill (``prefill``) a token at column ``t`` sees the keys with
    ``active_from <= t``; at decode steps every candidate of the row is active.
    """

    candidates: torch.Tensor  # (B, K) long
    active_from: torch.Tensor  # (B, K) long
    width: int  # T of the prefill
    prefill: bool

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether this scope describes a forward whose tokens are ``shape`` = (B, T)."""
        if len(shape) != 2 or shape[0] != self.candidates.shape[0]:
            return False
        return not self.prefill or shape[1] == self.width

    def decoding(self) -> Scope:
        """The same candidates for the decode steps that follow the prefill."""
        return Scope(self.candidates, self.active_from, self.width, False)

    def causal(self, n_tokens: int) -> torch.Tensor | None:
        """(B, T, K) bool: which candidate is active at which token of the prefill (None
        at decode steps: all of them)."""
        if not self.prefill:
            return None
        cols = torch.arange(n_tokens, device=self.active_from.device).view(1, -1, 1)
        return self.active_from.unsqueeze(1) <= cols


Decision = tuple[torch.Tensor, torch.Tensor]  # (fire, winner key row), each (B, T)


class _Step:
    """One forward's scope and the routing decision its first hook layer made."""

    __slots__ = ("decision", "scope")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.decision: Decision | None = None


class SubjectScope:
    """The subject index of one editor and the model pre-hook that decides each request's
    candidates (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._grams: dict[str, frozenset[TokenGram]] = {}
        self._rows_of: dict[str, list[int]] = {}
        self.index = SubjectIndex({})
        self._handle: RemovableHandle | None = None
        # the scope of the forward in progress, per thread / task (one variable per
        # tracker, so two editors never read each other's scope)
        self._current: ContextVar[_Step | None] = ContextVar(f"hook_scope_{id(self)}", default=None)

    # --- the index -----------------------------------------------------------------

    def sync(self, owners: Sequence[str], subjects: Mapping[str, tuple[str, str]]) -> None:
        """Rebuild the index for the gate key rows owned by ``owners`` (edit id per row).

        ``subjects`` gives ``(subject, prompt)`` of each owner not seen before; an edit
        that owns no row any more (retracted, superseded) leaves the index.
        """
        rows_of: dict[str, list[int]] = {}
        for row, edit_id in enumerate(owners):
            rows_of.setdefault(edit_id, []).append(row)
        grams: dict[str, frozenset[TokenGram]] = {}
        for edit_id in rows_of:
            known = self._grams.get(edit_id)
            if known is None:
                subject, prompt = subjects[edit_id]
                known = subject_grams(self.tokenizer, subject, prompt)
            grams[edit_id] = known
        self._grams = grams
        self._rows_of = rows_of
        self.index = SubjectIndex(grams)

    def edits(self) -> list[str]:
        """Ids of the edits in the index."""
        return list(self._grams)

    def scope_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Scope:
        """The candidates of every row of a ``(B, T)`` prefill (pads never match)."""
        batch, width = input_ids.shape
        ends: list[dict[str, int]] = [{} for _ in range(batch)]  # per row: edit -> end
        if len(self.index):
            ids = input_ids.masked_fill(~attention_mask.bool(), -1)
            hits = torch.isin(ids, self.index.first_tokens.to(ids.device)).nonzero().tolist()
            rows = ids.tolist() if hits else []
            for b, t in hits:
                for edit_id, end in self.index.matches_at(rows[b], t):
                    if end < ends[b].get(edit_id, width):
                        ends[b][edit_id] = end
        found = [
            {row: end for edit_id, end in row_ends.items() for row in self._rows_of[edit_id]}
            for row_ends in ends
        ]
        k = max((len(f) for f in found), default=0)
        pad = [(-1, width)]
        cand = [[*rows.items(), *pad * (k - len(rows))] for rows in found]
        table = torch.tensor(cand, dtype=torch.long).view(batch, k, 2).to(input_ids.device)
        return Scope(table[..., 0], table[..., 1], int(width), prefill=True)

    # --- the model pre-hook --------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Decide the scope at every top-level forward of ``model`` (idempotent)."""
        if self._handle is None:
            self._handle = model.register_forward_pre_hook(self._arm, with_kwargs=True)

    def close(self) -> None:
        """Remove the pre-hook; the hooks then use the pure-key gate."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._set(None)

    def current(self) -> Scope | None:
        """The scope of the forward in progress in this context (None: use the key gate)."""
        step = self._current.get()
        return None if step is None else step.scope

    def shared_decision(self) -> Decision | None:
        """The routing decision an earlier hook layer made in the forward in progress."""
        step = self._current.get()
        return None if step is None else step.decision

    def share_decision(self, decision: Decision) -> None:
        """Record this forward's routing decision for the hook layers above."""
        step = self._current.get()
        if step is not None:
            step.decision = decision

    def _set(self, scope: Scope | None) -> None:
        self._current.set(None if scope is None else _Step(scope))

    def _arm(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._set(None)  # inputs_embeds: the key gate decides
            return
        if not is_prefill(args, kwargs):
            previous = self.current()
            if previous is not None and previous.candidates.shape[0] == ids.shape[0]:
                self._set(previous if not previous.prefill else previous.decoding())
            else:
                self._set(None)
            return
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            mask = torch.ones_like(ids)
        self._set(self.scope_for(ids, mask))


# --- the subject gate -----------------------------------------------------------------


_NEVER_FIRES = float("inf")  # a reach no cosine passes (padding, keys without a reference)


def key_reach(
    key_mean: torch.Tensor, key_std: torch.Tensor, limit: float, cos_floor: float
) -> torch.Tensor:
    """The least centred cosine at which each key fires ``(m,)`` float32 (inf: never)."""
    reach = torch.clamp(key_mean.double() + limit * key_std.double(), min=cos_floor)
    return torch.nan_to_num(reach, nan=_NEVER_FIRES).float()


@dataclass(frozen=True)
class CandidateTable:
    """One hook layer's view of one request's candidates.

    Each row's ``K`` candidate keys are gathered once (a batched matmul against a few
    keys per row is cheaper than one matmul against all the batch's distinct
    candidates); padding columns and rows without candidates have an infinite
    threshold. ``shard`` and ``values`` are per stored key.
    """

    keys: torch.Tensor  # (B, K, d_in) centred unit keys of each row's candidates
    reach: torch.Tensor  # (B, 1, K) firing threshold (inf for padding)
    key: torch.Tensor  # (B, K) stored key row of each candidate (0 for padding)
    shard: torch.Tensor  # (m,) shard of every stored key
    values: torch.Tensor | None  # (m, d_out) snapped output of every stored key, or None


def candidate_table(
    candidates: torch.Tensor,
    keys_n: torch.Tensor,
    reach: torch.Tensor,
    key_shard: torch.Tensor,
    values: torch.Tensor | None,
) -> CandidateTable | None:
    """The table of ``candidates`` ``(B, K)`` (stored key rows, -1: padding); None when no
    row has a candidate. ``keys_n``, ``reach``, ``key_shard``, ``values``: per stored key."""
    valid = candidates >= 0
    if not bool(valid.any()):
        return None
    key = candidates.clamp(min=0)
    batch, k = key.shape
    return CandidateTable(
        keys=keys_n.index_select(0, key.reshape(-1)).view(batch, k, -1),
        reach=torch.where(valid, reach[key], _NEVER_FIRES).unsqueeze(1),
        key=key,
        shard=key_shard,
        values=values,
    )


def route_table(
    x: torch.Tensor, center: torch.Tensor, table: CandidateTable, causal: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fire, winner)`` ``(B, T)`` for the tokens ``x`` ``(B, T, d_in)``.

    ``fire``: some candidate fires; ``winner``: the winning candidate's stored key row
    (meaningless where nothing fires). ``causal`` ``(B, T, K)`` (None: all active)
    limits a token to the candidates whose subject ends at or before it. A token
    whose centred key is zero never fires. Pure function.
    """
    xc = x.float() - center  # (B, T, d_in)
    dot = torch.bmm(xc, table.keys.transpose(1, 2))  # (B, T, K): cosine times ||xc||
    ok = dot > table.reach * torch.linalg.vector_norm(xc, dim=-1, keepdim=True)  # cos > reach
    if causal is not None:
        ok = ok & causal
    best, nearest = torch.where(ok, dot, -_NEVER_FIRES).max(dim=-1)  # the largest cosine wins
    return best > -_NEVER_FIRES, table.key.gather(1, nearest)


def routes_of(table: CandidateTable, fire: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Shard per token ``(B, T)`` (-1: closed) from :func:`route_table`'s result."""
    return torch.where(fire, table.shard[winner], -1)


def add_values(
    out: torch.Tensor, table: CandidateTable, fire: torch.Tensor, winner: torch.Tensor
) -> torch.Tensor:
    """``out`` ``(B, T, d_out)`` plus the winning candidate's value where a key fires
    (float32, cast back; untouched elsewhere, bit for bit)."""
    assert table.values is not None
    new = (out.float() + table.values[winner]).to(out.dtype)
    return torch.where(fire.unsqueeze(-1), new, out)


# --- the subject gate's floor ---------------------------------------------------------


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
