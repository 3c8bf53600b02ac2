"""The fact world's tokenizer: a byte-level BPE trained on the world's corpus.

The result is a fast Hugging Face tokenizer (``tokenizer.json``) with ``<s>``,
``</s>``, ``<pad>`` and ``<unk>`` tokens that adds ``<s>`` in front of every
encoded text, so that ``AutoTokenizer.from_pretrained(folder)`` gives exactly
the encoding the model was trained with. Offsets map back to the text.

Alternatively the real GPT-2 vocabulary (``vocab.json`` + ``merges.txt``) can be
used; it gets the same special-token treatment, with ``<|endoftext|>`` as
bos, eos and pad.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from daemon.errors import WorldBuildError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
GPT2_SPECIAL = "<|endoftext|>"


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``corpus``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok, bos=BOS, eos=EOS, pad=PAD, unk=UNK)


def gpt2_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The real GPT-2 vocabulary from ``folder`` (vocab.json + merges.txt), bos-prefixed."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise WorldBuildError("vocab.json and merges.txt not found", path=folder)
    bpe = models.BPE.from_file(str(vocab), str(merges))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([GPT2_SPECIAL])
    return _wrap(tok, bos=GPT2_SPECIAL, eos=GPT2_SPECIAL, pad=GPT2_SPECIAL, unk=GPT2_SPECIAL)


def _wrap(tok: Tokenizer, *, bos: str, eos: str, pad: str, unk: str) -> PreTrainedTokenizerFast:
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    fast: PreTrainedTokenizerFast = cast(Any, PreTrainedTokenizerFast)(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast


def token_length(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of ``text`` alone (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
