"""Subject-aware scope for the hook gate: which edits are candidates for which tokens.

Every hook edit has a subject, and every rephrasing of the edit names that subject,
while most prompts the edit must leave alone do not. The subject gate therefore
asks two questions per token:

1. **Subject presence** (this module): an edit is a *candidate* for a token only
   if one of the edit's subject token n-grams occurs in the sequence and ends at
   or before that token (causal, like the key itself). An edit's n-grams
   (:func:`daemon.model.tokens.subject_grams`) are the subject tokenised alone, with a leading space
   (BPE tokenises ``" Acme"`` and ``"Acme"`` differently) and as it appears in the
   edit's own prompt (from character offsets). A :class:`SubjectIndex` maps first
   token -> n-gram length -> n-gram -> edits, so matching a sequence costs
   O(tokens x distinct lengths), not O(edits).
2. **Key similarity among the candidates only** (:func:`daemon.editors.hook.gate.
   route_candidates`): the token's key is scored against the candidate edits'
   keys alone, with their own z-score references and a cosine floor of its own.

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
prefill the tracker saw, another batch size) the hook falls back to the pure-key
gate of :mod:`daemon.editors.hook.gate`. Nothing here is persisted: the index is
rebuilt from the editor's records (their subjects and prompts) and the owner of
every gate key row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedTokenizerBase

from daemon.model.kv_cache import is_prefill
from daemon.model.tokens import TokenGram, subject_grams


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
