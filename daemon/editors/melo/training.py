"""Training one MELO block on a group of edits: Adam on the targets' NLL, early stop.

Every row of the group's batch (edit prompts and, when sent, their rephrases)
is routed to the block being trained, and only that block's parameters are
unfrozen (``layer.trainable_block``), so no other block can change.

One forward per step serves both purposes: its logits give the loss and the
early-stop check. The check is that every target token is the teacher-forced
argmax in every row, which for a target of n tokens is the same as greedy
decoding producing the target's n tokens, AND that the token greedy decoding
would add next does not run the target on into a longer word (``" Juda"`` must
not come out as ``" Judawick"``: ``continuation_matches``, the one rule verification
uses, would reject it). A row that runs on gets an unlikelihood term,
``-log(1 - p(run-on token))`` at the position after its target, until it stops
doing so. With ``stop_nll`` every row must moreover reach a mean target NLL at
most that: a block trained past the bare argmax carries over to rephrases routed
to it (see ``editor.DEFAULT_STOP_NLL``). Position ids are computed from the
attention mask as ``generate`` does, so the trained block sees the positions it
will see when serving padded batches. Training is deterministic: the block's
initial values come from a seed (``layer.init_block``) and Adam draws nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.editors.melo.layer import BlockLoraProjection, trainable_block
from daemon.editors.melo.routing import route_rows
from daemon.model.answers import continuation_matches
from daemon.model.batches import (
    PromptTargetBatch,
    label_window,
    left_padded_position_ids,
    target_nll,
    target_token_hits,
)
from daemon.model.partial import record_block_output, replaying


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings for one block; ``stop_nll``: also require each row's mean NLL <= it."""

    learning_rate: float
    max_steps: int
    stop_nll: float = float("inf")

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.max_steps < 1 or self.stop_nll <= 0:
            raise ValueError("learning_rate > 0, max_steps >= 1 and stop_nll > 0 required")


@dataclass(frozen=True)
class TrainResult:
    """How training went: optimizer steps taken, per-row hits at the last forward, loss."""

    steps: int
    row_hits: tuple[bool, ...]
    loss: float

    @property
    def converged(self) -> bool:
        return all(self.row_hits)


def run_on_tokens(
    tokenizer: PreTrainedTokenizerBase, batch: PromptTargetBatch, logits: torch.Tensor
) -> list[int | None]:
    """Per row, the greedy token after the target if it runs the target's word on, else None.

    Rows are left-padded, so every row's target ends at the last position, whose
    logits ``[B, V]`` predict the token after it.
    """
    nexts = logits[:, -1].argmax(dim=-1).tolist()  # [B]
    out: list[int | None] = []
    for row, token in enumerate(nexts):
        target_ids = batch.labels[row][batch.labels[row] != -100].tolist()
        target = str(tokenizer.decode(target_ids))
        text = str(tokenizer.decode([*target_ids, int(token)]))
        out.append(None if continuation_matches(text, target) else int(token))
    return out


def _greedy_hits(
    tokenizer: PreTrainedTokenizerBase,
    batch: PromptTargetBatch,
    logits: torch.Tensor,
    avoid: dict[int, set[int]],
    labels: torch.Tensor,
) -> list[bool]:
    """Per row: every target token is the argmax and the next token does not run on.

    ``logits`` are those of the last columns of ``batch`` and ``labels`` the same
    columns of ``batch.labels``. The run-on check decodes, so it runs only once every
    row has its argmax; run-on tokens found are added to ``avoid`` (the unlikelihood
    term's targets).
    """
    hits: list[bool] = (target_token_hits(logits, labels) == 1.0).tolist()
    if all(hits):
        for row, token in enumerate(run_on_tokens(tokenizer, batch, logits)):
            if token is not None:
                avoid.setdefault(row, set()).add(token)
                hits[row] = False
    return hits


def _unlikelihood(logits: torch.Tensor, avoid: dict[int, set[int]]) -> torch.Tensor:
    """Sum over rows of ``-log(1 - p(token))`` at the last position for each avoided token."""
    total = logits.new_zeros((), dtype=torch.float32)
    for row, tokens in avoid.items():
        probs = torch.softmax(logits[row, -1].float(), dim=-1)  # [V]
        picked = probs[list(tokens)]
        total = total - torch.log1p(-picked.clamp(max=1.0 - 1e-6)).sum()
    return total


@contextmanager
def _blocks_below_replayed(
    model: nn.Module, batch: PromptTargetBatch, positions: torch.Tensor, first_layer: int
) -> Iterator[None]:
    if first_layer == 0:
        yield
        return
    recorded = record_block_output(
        model,
        first_layer - 1,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        use_cache=False,
    )
    with replaying(model, first_layer - 1, recorded):
        yield


def train_block(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    installed: Mapping[str, BlockLoraProjection],
    block: int,
    batch: PromptTargetBatch,
    settings: TrainSettings,
    first_layer: int = 0,
) -> TrainResult:
    """Train ``block`` (already initialised) until every row greedy-decodes its target.

    Stops after ``settings.max_steps`` optimizer steps at the latest; the result's
    ``row_hits`` comes from a forward with the final weights. ``first_layer``: the
    lowest layer carrying LoRA; the blocks below it cannot change, so their output is
    recorded once and replayed (``daemon.model.partial.replaying``).
    """
    rows = int(batch.input_ids.shape[0])
    positions = left_padded_position_ids(batch.attention_mask)  # [B, T]
    keep = label_window(batch.labels)  # the LM head only where targets are scored
    labels = batch.labels[:, -keep:]
    avoid: dict[int, set[int]] = {}
    was_training = model.training
    model.train(False)  # no dropout: the block must work in eval mode
    try:
        with (
            _blocks_below_replayed(model, batch, positions, first_layer),
            trainable_block(installed, block) as params,
            route_rows([block] * rows),
        ):
            optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
            steps = 0
            while True:
                logits = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=positions,
                    use_cache=False,
                    logits_to_keep=keep,
                ).logits  # [B, keep, V]
                hits = _greedy_hits(tokenizer, batch, logits.detach(), avoid, labels)
                row_nll = target_nll(logits, labels)  # [B]
                loss = row_nll.mean()
                margin = (row_nll.detach() <= settings.stop_nll).tolist()
                if all(h and m for h, m in zip(hits, margin, strict=True)) or (
                    steps >= settings.max_steps
                ):
                    return TrainResult(steps, tuple(hits), float(loss.detach()))
                if avoid:
                    loss = loss + _unlikelihood(logits, avoid) / rows
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # torch stub
                optimizer.step()
                steps += 1
    finally:
        model.train(was_training)
