"""Pre-train a small Llama or GPT-2 causal LM until it knows the world's facts.

Every training sentence is ``<s> prompt target.</s>``. The loss is the
token-level cross-entropy over the whole sentence, with the answer tokens
(the target's tokens and the full stop after them) weighted
``object_loss_weight`` times: with a uniform loss a small model sits on a
plateau for a long time (``docs/environment.md``, "Teaching a small model its
facts").

Progress is measured as teacher-forced answer accuracy: an example counts when
every answer token is the argmax given the true prefix, which is exactly the
condition under which greedy decoding produces the target followed by ``.``.
Training stops early once an epoch's running accuracy, confirmed by a full
evaluation pass, reaches ``stop_accuracy``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from daemon.log import get_logger

Arch = Literal["llama", "gpt2"]
ARCHS: tuple[Arch, ...] = ("llama", "gpt2")
log = get_logger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """Model shape and optimisation settings for one world size."""

    n_layers: int
    hidden: int
    n_heads: int
    max_steps: int
    batch_size: int
    lr: float
    intermediate: int | None = None  # MLP width; None means 4 x hidden
    warmup_steps: int = 50
    weight_decay: float = 0.0
    object_loss_weight: float = 5.0
    stop_accuracy: float = 1.0
    max_positions: int = 512
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads:
            raise ValueError("hidden must be a multiple of n_heads")
        if min(self.n_layers, self.max_steps, self.batch_size) < 1 or self.lr <= 0:
            raise ValueError("n_layers, max_steps, batch_size and lr must be positive")
        if not 0.0 < self.stop_accuracy <= 1.0:
            raise ValueError("stop_accuracy must be in (0, 1]")

    @property
    def mlp_width(self) -> int:
        return self.intermediate if self.intermediate is not None else 4 * self.hidden


@dataclass(frozen=True)
class TrainResult:
    """What training did: steps taken, final teacher-forced accuracy, time, final loss."""

    steps: int
    epochs: int
    teacher_forced_accuracy: float
    seconds: float
    final_loss: float


@dataclass(frozen=True)
class Encoded:
    """Right-padded training sentences and their loss weights and answer masks."""

    input_ids: torch.Tensor  # (N, T) long, padded with pad_id
    attention_mask: torch.Tensor  # (N, T) long
    answer_mask: torch.Tensor  # (N, T) bool: token t is an answer token
    lengths: torch.Tensor  # (N,) long


def build_model(arch: Arch, spec: TrainSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised model of ``arch`` sized by ``spec`` for ``tokenizer``."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model: PreTrainedModel
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.hidden,
                intermediate_size=spec.mlp_width,
                num_hidden_layers=spec.n_layers,
                num_attention_heads=spec.n_heads,
                num_key_value_heads=spec.n_heads,
                max_position_embeddings=spec.max_positions,
                tie_word_embeddings=True,
                **ids,
            )
        )
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_embd=spec.hidden,
                n_layer=spec.n_layers,
                n_head=spec.n_heads,
                n_positions=spec.max_positions,
                n_inner=spec.mlp_width,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
        )
    else:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {ARCHS})")
    cast(Any, model.generation_config).update(do_sample=False, **ids)
    return model


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]]
) -> Encoded:
    """Tokenise ``prompt + target + '.'`` + eos and mark the answer tokens."""
    rows: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for prompt, target in examples:
        head = tokenizer(prompt)["input_ids"]
        answer = tokenizer(prompt + target)["input_ids"]
        full = tokenizer(prompt + target + ".")["input_ids"]
        if full[: len(head)] != head or full[: len(answer)] != answer:
            raise ValueError(f"answer does not start on a token boundary: {prompt!r} {target!r}")
        rows.append([*full, tokenizer.eos_token_id])
        spans.append((len(head), len(full)))
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((n, width), dtype=torch.bool)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    for i, (row, (start, stop)) in enumerate(zip(rows, spans, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        answer_mask[i, start:stop] = True
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return Encoded(ids, mask, answer_mask, lengths)


def _batch(data: Encoded, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = int(data.lengths[idx].max())
    return (
        data.input_ids[idx, :width],
        data.attention_mask[idx, :width],
        data.answer_mask[idx, :width],
    )


def _loss_and_hits(
    model: PreTrainedModel, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted LM loss and, per example, whether every answer token is the argmax."""
    ids, mask, answer = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    labels, live, ans = ids[:, 1:], mask[:, 1:].bool(), answer[:, 1:]  # (B, T-1)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T-1)
    w = live.float() + (weight - 1.0) * ans.float()
    loss = (ce * w).sum() / w.sum()
    wrong = (logits.argmax(-1) != labels) & ans
    return loss, ~wrong.any(dim=1)


@torch.no_grad()
def teacher_forced_accuracy(model: PreTrainedModel, data: Encoded, batch_size: int = 256) -> float:
    """Fraction of examples whose answer tokens are all argmax under teacher forcing."""
    was_training = model.training
    model.train(False)
    hits = 0
    n = data.input_ids.shape[0]
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        _, ok = _loss_and_hits(model, _batch(data, idx), 1.0)
        hits += int(ok.sum())
    model.train(was_training)
    return hits / max(n, 1)


def _lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine decay to 10% at ``max_steps``."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


@dataclass
class _Run:
    """Mutable state of one training run."""

    model: PreTrainedModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    bar: Any
    step: int = 0
    epoch: int = 0
    loss: float = math.nan


def train_model(
    model: PreTrainedModel,
    data: Encoded,
    spec: TrainSpec,
    *,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``data``; return what happened. Leaves it in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    bar = tqdm(total=spec.max_steps, desc="training world model", disable=not progress, unit="step")
    run = _Run(model, opt, sched, bar)
    started = time.monotonic()
    accuracy = 0.0
    model.train()
    while run.step < spec.max_steps:
        running = _epoch(run, data, spec, gen)
        log.debug(
            "world_epoch_finished",
            epoch=run.epoch,
            step=run.step,
            loss=run.loss,
            running_accuracy=running,
            seconds=round(time.monotonic() - started, 1),
        )
        # The running figure lags the model's state at the end of the epoch: check
        # for real a little before it reaches the bar.
        if running >= spec.stop_accuracy - 0.02:
            accuracy = teacher_forced_accuracy(model, data, spec.eval_batch_size)
            log.debug("world_epoch_checked", epoch=run.epoch, step=run.step, accuracy=accuracy)
            if accuracy >= spec.stop_accuracy:
                break
    bar.close()
    model.train(False)
    if accuracy < spec.stop_accuracy:
        accuracy = teacher_forced_accuracy(model, data, spec.eval_batch_size)
    seconds = time.monotonic() - started
    return TrainResult(run.step, run.epoch, accuracy, seconds, run.loss)


def _epoch(run: _Run, data: Encoded, spec: TrainSpec, gen: torch.Generator) -> float:
    """One pass over ``data`` (or up to ``max_steps``); returns the running answer accuracy."""
    run.epoch += 1
    n = data.input_ids.shape[0]
    seen = hits = 0
    for idx in torch.split(torch.randperm(n, generator=gen), spec.batch_size):
        loss, ok = _loss_and_hits(run.model, _batch(data, idx), spec.object_loss_weight)
        run.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        run.opt.step()
        run.sched.step()
        run.step, seen, hits = run.step + 1, seen + len(idx), hits + int(ok.sum())
        run.loss = float(loss.detach())
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{run.loss:.3f}", acc=f"{hits / seen:.3f}", epoch=run.epoch)
        if run.step >= spec.max_steps:
            return 0.0  # a partial epoch says nothing about the whole data
    return hits / max(seen, 1)
