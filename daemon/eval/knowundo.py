"""KnowUnDo's privacy split through editd: teach a model fictitious people, forget some.

The usual unlearning protocol (KnowUnDo, zjunlp/unlearn; ``../shared/data/knowundo``):

1. fine-tune a copy of the model on the whole split (``full.json``: question → answer
   about fictitious people), so that it knows them (:func:`finetune`);
2. forget the ``unlearn`` questions through editd: one ``forget`` request per question,
   its subject the person the question names (:func:`person_of`), no target (the
   withheld answer) and no ``target_true`` (the worker reads what the model says);
3. score every question by greedy generation (``ANSWER_TOKENS`` tokens) against its
   reference answer with ROUGE-L recall (:func:`rouge_l_recall`): **forget efficacy** is
   ``1 - edited / fine-tuned`` on the unlearn questions, **retention** ``edited /
   fine-tuned`` on the ``retention`` questions (the same people's other facts, which
   must survive), each next to the fine-tuned model's own score.

Questions are asked in the form ``QA_FORMAT`` both when teaching and when scoring.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.config import RouterConfig
from daemon.engine.engine import Engine
from daemon.eval.routed import apply_in_sequence
from daemon.model.batches import encode_prompt_target, label_window, left_padded_position_ids
from store.schema import EditKind, EditRequest, EditSource, SourceKind

QA_FORMAT = "Question: {question}\nAnswer:"
ANSWER_TOKENS = 48
_NAME = re.compile(r"[A-Z][a-z]+(?: [A-Z][a-z]+)+")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class QA:
    """One KnowUnDo record: a question about a fictitious person, and its answer."""

    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return QA_FORMAT.format(question=self.question)


def load_split(path: Path) -> list[QA]:
    """A KnowUnDo file (``[{"text": question, "labels": answer}, ...]``)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    return [QA(r["text"].strip(), r["labels"].strip()) for r in records]


def person_of(question: str) -> str | None:
    """The person a question names: its first run of two or more capitalised words
    ("Who are Isabella Marquez's parents?" → "Isabella Marquez"), or None."""
    found = _NAME.search(question)
    return found.group(0) if found else None


def rouge_l_recall(candidate: str, reference: str) -> float:
    """ROUGE-L recall over lower-cased word tokens: LCS length / reference length."""
    ref = [w.casefold() for w in _WORD.findall(reference)]
    cand = [w.casefold() for w in _WORD.findall(candidate)]
    if not ref:
        return math.nan
    previous = [0] * (len(cand) + 1)
    for r in ref:
        current = [0]
        for j, c in enumerate(cand):
            current.append(previous[j] + 1 if r == c else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[QA],
    *,
    epochs: int = 4,
    learning_rate: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Teach ``model`` the answers, in place: AdamW on the answer tokens (and an end of
    sequence) given ``QA_FORMAT`` prompts, linear decay; returns each epoch's mean loss."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token or ""
    order = list(pairs)
    steps = epochs * math.ceil(len(order) / batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 1 - s / max(1, steps))
    device = next(model.parameters()).device
    model.train(True)
    losses: list[float] = []
    step = 0
    try:
        for _ in range(epochs):
            rng.shuffle(order)
            total = 0.0
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = encode_prompt_target(
                    tokenizer, [q.prompt for q in chunk], [" " + q.answer + eos for q in chunk]
                ).to(device)
                keep = label_window(batch.labels)
                logits = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=left_padded_position_ids(batch.attention_mask),
                    logits_to_keep=keep,
                ).logits
                labels = batch.labels[:, -keep:]
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
                )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                schedule.step()
                step += 1
                value = float(loss.detach())
                total += value * len(chunk)
                if on_step is not None:
                    on_step(step, value)
            losses.append(total / len(order))
    finally:
        model.train(False)
        model.requires_grad_(False)
    return losses


def forget_requests(qas: Sequence[QA], withheld: str) -> tuple[list[EditRequest], int]:
    """One ``forget`` per question that names a person (as intake stores it: the
    withheld answer as target); and how many questions named nobody."""
    out: list[EditRequest] = []
    skipped = 0
    for i, qa in enumerate(qas):
        person = person_of(qa.question)
        if person is None:
            skipped += 1
            continue
        out.append(
            EditRequest(
                prompt=qa.prompt,
                target=withheld,
                id=f"knowundo-{i}",
                subject=person,
                kind=EditKind.FORGET,
                source=EditSource(kind=SourceKind.EVAL),
            )
        )
    return out, skipped


def recall_scores(engine: Engine, qas: Sequence[QA]) -> list[float]:
    """Each question's ROUGE-L recall of its answer in the model's greedy reply."""
    replies = engine.greedy([q.prompt for q in qas], ANSWER_TOKENS)
    return [rouge_l_recall(r, q.answer) for r, q in zip(replies, qas, strict=True)]


def run_knowundo(
    engine: Engine,
    unlearn: Sequence[QA],
    retention: Sequence[QA],
    router: RouterConfig,
    *,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Steps 2 and 3 of the module doc on a fine-tuned ``engine``; a JSON object."""
    requests, skipped = forget_requests(unlearn, engine.kinds.withheld_answer)
    forgotten = [qa for qa, r in zip(unlearn, _named(unlearn), strict=True) if r]
    base_unlearn = _mean(recall_scores(engine, forgotten))
    base_retention = _mean(recall_scores(engine, retention))
    done = apply_in_sequence(engine, requests, router, batch_size=batch_size)
    edited_unlearn = _mean(recall_scores(engine, forgotten))
    edited_retention = _mean(recall_scores(engine, retention))
    return {
        "unlearn_questions": len(forgotten),
        "named_nobody": skipped,
        "retention_questions": len(retention),
        "applied": done.applied,
        "applied_by": done.applied_by,
        "failed": len(done.failed),
        "failures": dict(list(done.failed.items())[:10]),
        "s_per_forget": done.seconds_per_edit(),
        "finetuned_rouge_l": {"unlearn": base_unlearn, "retention": base_retention},
        "edited_rouge_l": {"unlearn": edited_unlearn, "retention": edited_retention},
        "forget_efficacy": 1 - edited_unlearn / base_unlearn if base_unlearn else math.nan,
        "retention": edited_retention / base_retention if base_retention else math.nan,
    }


def _named(qas: Sequence[QA]) -> list[bool]:
    return [person_of(q.question) is not None for q in qas]


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
