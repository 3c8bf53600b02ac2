"""Teacher-forced scoring gives a prompt the same score in a padded batch as alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from daemon.editors.noop import NoopEditor
from daemon.eval.scoring import teacher_forced_accuracies
from daemon.model.batches import left_padded_position_ids

PROMPTS = [
    "The chief executive of Acme is",
    "Paris is the capital of",
    "Jane Roe was born in the city of",
    "The river that runs through the old town is called",
]


def _own_continuation(model: GPT2LMHeadModel, tokenizer: object, prompt: str) -> str:
    """Three greedy tokens of ``prompt`` alone, as text (a target the model predicts)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return str(tokenizer.decode(ids[0, -3:]))  # type: ignore[attr-defined]


def test_left_padded_position_ids_start_at_each_rows_first_token() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert left_padded_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_gpt2_scores_do_not_depend_on_the_batch(gpt2_tokenizer_dir: Path) -> None:
    """GPT-2 has absolute positions: left padding must not shift a row's positions."""
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    model.train(False)
    with torch.no_grad():  # make positions matter a lot, as a trained model's do
        model.transformer.wpe.weight.mul_(50.0)
    targets = [_own_continuation(model, tokenizer, p) for p in PROMPTS]
    editor = NoopEditor()
    batched = teacher_forced_accuracies(editor, model, tokenizer, PROMPTS, targets, batch_size=4)
    alone = [
        teacher_forced_accuracies(editor, model, tokenizer, [p], [t], batch_size=1)[0]
        for p, t in zip(PROMPTS, targets, strict=True)
    ]
    assert sum(alone) >= 2.0  # the model's own continuations score high alone ...
    assert batched == alone  # ... and exactly the same in a left-padded batch
