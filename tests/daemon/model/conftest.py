"""Tiny models and tokenizers for the model-layer tests, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The chief executive of Acme is Jane Roe",
    "Jane Roe was born in Paris",
    "Acme Corporation hired a new chief",
    "The capital of Veloria is Marnport",
    "Bill Lumbergh works for Initech",
]


def eval_mode(model: PreTrainedModel) -> PreTrainedModel:
    """``model.eval()``, typed (transformers leaves ``PreTrainedModel.eval`` unannotated)."""
    cast(nn.Module, model).eval()
    return model


def tiny_gpt2(vocab_size: int = 64, n_layer: int = 2) -> PreTrainedModel:
    """A random 2-layer, width-32 GPT-2 in eval mode (Conv1D projections)."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    return eval_mode(GPT2LMHeadModel(config))


def tiny_llama(vocab_size: int = 64, n_layer: int = 2) -> PreTrainedModel:
    """A random 2-layer, width-32 Llama in eval mode (Linear projections, gated MLP)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return eval_mode(LlamaForCausalLM(config))


def build_bos_tokenizer(pre_tokenizer: str = "whitespace") -> PreTrainedTokenizerFast:
    """A BPE trained on ``CORPUS`` whose post-processor prepends ``<s>`` (like Llama).

    ``whitespace`` spans exclude the spaces; ``metaspace`` gives ``▁Acme`` tokens whose
    spans start at the preceding space, as SentencePiece-style tokenizers do.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS * 5, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    make = cast(Any, PreTrainedTokenizerFast)  # its __init__ is unannotated
    wrapped: PreTrainedTokenizerFast = make(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    return wrapped


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The real GPT-2 byte-level BPE (no pad token, right padding, as shipped).

    Built with ``from_pretrained``: in transformers 5, ``GPT2TokenizerFast(vocab_file=...,
    merges_file=...)`` silently builds an EMPTY vocabulary.
    """
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    assert tokenizer.is_fast and len(tokenizer) == 50257
    return tokenizer


@pytest.fixture(scope="session", params=["whitespace", "metaspace"])
def bos_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    """A tokenizer that adds ``<s>`` at the start, in two pre-tokenizer flavours."""
    return build_bos_tokenizer(request.param)
