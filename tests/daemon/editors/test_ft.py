"""The FT-L baseline trains on each prompt at the positions it has alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from daemon.editors.base import EditSpec
from daemon.editors.ft import FtConfig, FtEditor
from daemon.model.batches import encode_prompt_target, target_nll

SHORT = EditSpec("short", "The chief executive of Acme is", " Jane Roe")
LONG = EditSpec(
    "long", "The river that runs through the old town of Saint Petersburg is called", " the Neva"
)


def _first_forward_nll(editor: FtEditor, edits: list[EditSpec]) -> torch.Tensor:
    """Per row, the target NLL of the first (unedited) forward pass ``apply`` makes."""
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, _args: Any, output: Any) -> None:
        seen.append(output.logits.detach())

    handle = editor.model.register_forward_hook(grab)
    try:
        editor.apply(edits)
    finally:
        handle.remove()
    batch = encode_prompt_target(
        editor.tokenizer, [e.prompt for e in edits], [e.target for e in edits]
    )
    labels = batch.labels[:, -seen[0].shape[1] :]  # the editor keeps the target columns
    return target_nll(seen[0], labels)


def test_gpt2_rows_score_the_same_alone_and_left_padded(gpt2_tokenizer_dir: Path) -> None:
    """GPT-2 has absolute positions: a left-padded row must keep the positions it has alone."""
    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    model.train(False)
    with torch.no_grad():  # make positions matter as a trained model's do
        model.transformer.wpe.weight.mul_(50.0)
    editor = FtEditor(model, tokenizer, FtConfig(layer=0, max_steps=1))
    alone = _first_forward_nll(editor, [SHORT])
    editor.retract(["short"])  # back to the base weight
    batched = _first_forward_nll(editor, [LONG, SHORT])
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-4)
