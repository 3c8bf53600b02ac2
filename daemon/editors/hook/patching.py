"""The activation-patching passes behind ``editd locate`` (see ``locate`` for the method).

Everything here runs batched: one row per (pair, site, position kind, layer)
patch, left padded, with position ids counted from each row's first real token
so absolute-position models (GPT-2) see the same positions as unpadded runs.
``locate`` turns what these passes measure into evidence and a choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import structlog
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.errors import EditValidationError
from daemon.model import arch
from daemon.model.batches import left_pad, padded_forward_inputs, padding_id, target_token_ids
from daemon.model.tokens import subject_char_span, subject_last_token_index

PositionKind = Literal["subject_last", "prompt_last"]
Site = Literal["residual", "mlp_out"]
KINDS: tuple[PositionKind, ...] = get_args(PositionKind)
SITES: tuple[Site, ...] = get_args(Site)
SUBJECT_PLACEHOLDER = "{subject}"

log = structlog.get_logger()


@dataclass(frozen=True)
class TraceFact:
    """A prompt the model should complete with ``answer``, and the subject in it.

    ``answer=None`` means "whatever the model answers" (its greedy first token):
    a user's edit file holds NEW targets the model does not know, so the model's
    own answer is the fact being recalled. Otherwise the fact is used only when the
    model's greedy next token is the answer's first token.
    """

    prompt: str
    subject: str
    answer: str | None = None

    def template(self) -> str:
        """The prompt with the subject's first occurrence replaced by ``{subject}``."""
        start, end = subject_char_span(self.prompt, self.subject)
        return self.prompt[:start] + SUBJECT_PLACEHOLDER + self.prompt[end:]


@dataclass(frozen=True)
class _Batch:
    """Left-padded rows; ``kind_pos`` holds each row's subject-last and prompt-last index."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    kind_pos: torch.Tensor  # (B, 2)


def _batch(
    rows: Sequence[list[int]], subject_last: Sequence[int], pad_id: int, device: torch.device
) -> _Batch:
    ids, mask = left_pad(rows, pad_id)  # (B, T) each
    width = ids.shape[1]
    offsets = [width - len(row) for row in rows]
    kind_pos = torch.tensor(
        [[off + subj, width - 1] for off, subj in zip(offsets, subject_last, strict=True)],
        dtype=torch.long,
    )  # (B, 2)
    return _Batch(ids.to(device), mask.to(device), kind_pos.to(device))


def _fact_batch(
    prep: Prepared, indices: Sequence[int], pad_id: int, device: torch.device
) -> _Batch:
    """A left-padded batch of the prepared facts at ``indices`` (repeats allowed)."""
    return _batch(
        [prep.rows[i] for i in indices], [prep.subject_last[i] for i in indices], pad_id, device
    )


def _last_logits(model: nn.Module, batch: _Batch) -> torch.Tensor:
    """Logits at each row's last (real) token: ``(B, V)`` float32."""
    out = model(
        **padded_forward_inputs(batch.input_ids, batch.attention_mask),
        logits_to_keep=1,
        use_cache=False,
    )
    return cast(torch.Tensor, out.logits[:, -1].float())


_Tap = Callable[[Site, int, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def _tapped(model: nn.Module, tap: _Tap) -> Iterator[None]:
    """Call ``tap(site, layer, hidden)`` on every block and MLP projection output.

    A returned tensor replaces the output (the first element of a tuple output).
    """

    def make(site: Site, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            new = tap(site, layer, hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = []
    try:
        for i in range(arch.num_layers(model)):
            for site, module in (
                ("residual", arch.layer_block(model, i)),
                ("mlp_out", arch.mlp_out_module(model, i)),
            ):
                handles.append(module.register_forward_hook(make(cast(Site, site), i)))
        yield
    finally:
        for h in handles:
            h.remove()


def _grabber(store: dict[tuple[Site, int], torch.Tensor], kind_pos: torch.Tensor) -> _Tap:
    """A tap that keeps each output at the rows' two positions: ``(B, kinds, d)``."""
    rows = torch.arange(kind_pos.shape[0], device=kind_pos.device)[:, None]  # (B, 1)

    def tap(site: Site, layer: int, hidden: torch.Tensor) -> None:
        store[(site, layer)] = hidden[rows, kind_pos].detach()  # (B, kinds, d)

    return tap


def _patcher(plan: Mapping[tuple[int, int], tuple[torch.Tensor, ...]]) -> _Tap:
    """A tap that writes B's vectors into the planned rows and positions."""

    def tap(site: Site, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        step = plan.get((SITES.index(site), layer))
        if step is None:
            return None
        where, pos, vectors = step
        hidden = hidden.clone()
        hidden[where, pos] = vectors.to(hidden.dtype)
        return hidden

    return tap


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


# --- the three passes ----------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    facts: list[TraceFact]
    rows: list[list[int]]  # token ids (with the tokenizer's special tokens)
    subject_last: list[int]  # index into rows[i]

    def subset(self, indices: Sequence[int]) -> Prepared:
        return Prepared(
            [self.facts[i] for i in indices],
            [self.rows[i] for i in indices],
            [self.subject_last[i] for i in indices],
        )


def prepare(tokenizer: PreTrainedTokenizerBase, facts: Sequence[TraceFact]) -> Prepared:
    """Tokenise each distinct fact once; facts whose subject maps to no token are dropped."""
    kept: list[TraceFact] = []
    rows: list[list[int]] = []
    subj: list[int] = []
    for fact in dict.fromkeys(facts):
        try:
            index = subject_last_token_index(tokenizer, fact.prompt, fact.subject)
        except EditValidationError as e:
            log.debug("locate_fact_skipped", prompt=fact.prompt, reason=str(e))
            continue
        kept.append(fact)
        rows.append(list(tokenizer(fact.prompt)["input_ids"]))
        subj.append(index)
    return Prepared(kept, rows, subj)


def recalled_tokens(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prep: Prepared, batch_rows: int
) -> list[int | None]:
    """Per fact, the first answer token when the model's greedy next token is it, else None."""
    device = next(model.parameters()).device
    greedy: list[int] = []
    for chunk in _chunks(len(prep.rows), batch_rows):
        batch = _fact_batch(prep, chunk, padding_id(tokenizer), device)
        greedy.extend(int(t) for t in _last_logits(model, batch).argmax(-1))
    out: list[int | None] = []
    for fact, token in zip(prep.facts, greedy, strict=True):
        if fact.answer is None:
            out.append(token)
            continue
        wanted = target_token_ids(tokenizer, fact.prompt, fact.answer)
        out.append(token if wanted and wanted[0] == token else None)
    return out


def capture_donor_states(
    model: nn.Module, prep: Prepared, pad_id: int, batch_rows: int
) -> torch.Tensor:
    """Clean hidden states of the facts: ``(N, sites, L, kinds, d)`` in the model's dtype."""
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    for chunk in _chunks(len(prep.rows), batch_rows):
        batch = _fact_batch(prep, chunk, pad_id, device)
        grabbed: dict[tuple[Site, int], torch.Tensor] = {}
        with _tapped(model, _grabber(grabbed, batch.kind_pos)):
            _last_logits(model, batch)
        n_layers = arch.num_layers(model)
        parts.append(
            torch.stack(
                [torch.stack([grabbed[(s, i)] for i in range(n_layers)], 1) for s in SITES], 1
            )
        )  # (B, sites, L, kinds, d)
    return torch.cat(parts)


_Condition = tuple[int, int, int]  # (site index, layer, kind index)


def patched_scores(
    model: nn.Module,
    prep: Prepared,
    pairs: Sequence[tuple[int, int]],
    tokens: Sequence[int],
    states: torch.Tensor,
    slots: Sequence[int],
    pad_id: int,
    batch_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Moved fractions and donor probabilities ``(sites, kinds, L)`` and the unpatched prob.

    ``states[slots[p]]`` holds the clean states of pair ``p``'s donor B.
    """
    n_layers = arch.num_layers(model)
    device = next(model.parameters()).device
    conditions: list[_Condition | None] = [None] + [
        (s, layer, k) for s in range(len(SITES)) for layer in range(n_layers) for k in range(2)
    ]
    jobs = [(p, c) for p in range(len(pairs)) for c in range(len(conditions))]
    moved = torch.zeros((len(SITES), 2, n_layers), dtype=torch.float64)
    prob = torch.zeros_like(moved)
    baseline = 0.0
    for chunk in _chunks(len(jobs), batch_rows):
        rows = [jobs[j] for j in chunk]
        batch = _fact_batch(prep, [pairs[p][0] for p, _ in rows], pad_id, device)
        plan = _plan(rows, slots, conditions, states, batch.kind_pos)
        with _tapped(model, _patcher(plan)):
            probs = torch.softmax(_last_logits(model, batch), dim=-1)  # (B, V)
        donor = torch.tensor([tokens[pairs[p][1]] for p, _ in rows], device=probs.device)
        p_donor = probs.gather(1, donor[:, None]).squeeze(1).double().cpu()  # (B,)
        hit = (probs.argmax(-1) == donor).double().cpu()  # (B,)
        for r, (_, c) in enumerate(rows):
            cond = conditions[c]
            if cond is None:
                baseline += float(p_donor[r])
                continue
            s, layer, k = cond
            moved[s, k, layer] += hit[r]
            prob[s, k, layer] += p_donor[r]
    n = len(pairs)
    return moved / n, prob / n, baseline / n


def _plan(
    rows: Sequence[tuple[int, int]],
    slots: Sequence[int],
    conditions: Sequence[_Condition | None],
    states: torch.Tensor,
    kind_pos: torch.Tensor,
) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    """Per (site, layer): the batch rows to patch, their positions, and B's vectors."""
    grouped: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for r, (p, c) in enumerate(rows):
        cond = conditions[c]
        if cond is not None:
            s, layer, k = cond
            grouped.setdefault((s, layer), []).append((r, k, slots[p]))
    plan: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    for (s, layer), items in grouped.items():
        where = torch.tensor([r for r, _, _ in items], device=kind_pos.device)
        kinds = torch.tensor([k for _, k, _ in items], device=kind_pos.device)
        donors = torch.tensor([b for _, _, b in items], device=states.device)
        vectors = states[donors, s, layer, kinds.to(states.device)]  # (R, d)
        plan[(s, layer)] = (where, kind_pos[where, kinds], vectors)
    return plan
