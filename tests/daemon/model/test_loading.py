"""load_model on tiny models saved to disk, and its one-line failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import torch
from torch import nn
from transformers import AutoTokenizer, ByT5Tokenizer, GPTNeoConfig, PreTrainedTokenizerBase

from daemon.errors import ModelLoadError, UnsupportedArchitectureError
from daemon.model import loading
from daemon.model.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from tests.daemon.model.conftest import build_bos_tokenizer, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 saved with the real GPT-2 tokenizer (which has no pad token)."""
    path = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(vocab_size=50257).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved with a BOS-adding tokenizer that has its own pad token."""
    path = tmp_path_factory.mktemp("llama")
    tokenizer = build_bos_tokenizer("metaspace")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _assert_frozen_eval(loaded: LoadedModel) -> None:
    assert not loaded.model.training
    assert all(not m.training for m in loaded.model.modules())
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_load_gpt2_sets_pad_and_left_padding(gpt2_dir: Path) -> None:
    """GPT-2 loads frozen in eval mode; eos becomes the pad token; padding is on the left."""
    with structlog.testing.capture_logs() as logs:
        loaded = load_model(str(gpt2_dir), device="cpu")
    _assert_frozen_eval(loaded)
    assert loaded.arch.model_type == "gpt2"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32
    tok = loaded.tokenizer
    assert tok.is_fast and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    embedding = loaded.model.get_input_embeddings()
    assert isinstance(embedding, nn.Embedding) and len(tok) == embedding.num_embeddings
    assert loaded.model.generation_config.pad_token_id == tok.pad_token_id
    assert loaded.name_or_path == str(gpt2_dir) and loaded.load_seconds > 0
    event = next(e for e in logs if e["event"] == "model_loaded")
    assert event["device"] == "cpu" and event["dtype"] == "float32"
    assert event["params"] == sum(p.numel() for p in loaded.model.parameters())


def test_load_llama_keeps_its_pad_token_and_casts_dtype(llama_dir: Path) -> None:
    """A tokenizer's own pad token is kept; dtype='bf16' casts the weights."""
    loaded = load_model(str(llama_dir), device="cpu", dtype="bf16")
    _assert_frozen_eval(loaded)
    assert loaded.arch.model_type == "llama"
    assert loaded.tokenizer.pad_token == "<pad>"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    batch = loaded.tokenizer(
        ["Jane Roe", "Acme Corporation hired"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = loaded.model(**batch).logits  # [B, T, V]
    assert logits.shape[0] == 2 and not torch.isnan(logits).any()


def _assert_one_line(error: BaseException, *needles: str) -> None:
    message = str(error)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_folder_is_one_line_naming_the_path(tmp_path: Path) -> None:
    """A folder that does not exist fails before any library call."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing), device="cpu")
    _assert_one_line(info.value, str(missing), "does not exist")


def test_name_not_in_cache_is_one_line_and_chained() -> None:
    """A hub id that is not cached (offline) gives one line, chained to the hub error."""
    with pytest.raises(ModelLoadError) as info:
        load_model("editd-tests/not-a-cached-model", device="cpu")
    _assert_one_line(info.value, "editd-tests/not-a-cached-model", "not in the local HF cache")
    assert isinstance(info.value.__cause__, OSError)


def test_folder_without_config_or_weights(tmp_path: Path, gpt2_dir: Path) -> None:
    """A missing config.json or missing weights are named in the message."""
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(info.value, str(tmp_path), "no config.json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for item in gpt2_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            (no_weights / item.name).write_bytes(item.read_bytes())
    with pytest.raises(ModelLoadError) as info:
        load_model(str(no_weights), device="cpu")
    _assert_one_line(info.value, str(no_weights), "model weights")
    assert info.value.__cause__ is not None


def test_unsupported_architecture_fails_before_weights(tmp_path: Path) -> None:
    """A config of a type outside the table is refused without reading weights."""
    GPTNeoConfig(
        num_layers=2, hidden_size=32, num_heads=2, attention_types=[[["global"], 2]]
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neo"):
        load_model(str(tmp_path), device="cpu")


def test_slow_tokenizer_is_refused(tmp_path: Path) -> None:
    """A Python-only tokenizer (no offsets) is a ModelLoadError."""
    ByT5Tokenizer().save_pretrained(tmp_path)
    tiny_gpt2(vocab_size=384).config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(info.value, "not a fast tokenizer", "ByT5Tokenizer")


def test_missing_tokenizer_files_are_refused(tmp_path: Path) -> None:
    """transformers builds an empty tokenizer from a folder without one; editd refuses it."""
    tiny_gpt2().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="empty vocabulary"):
        load_model(str(tmp_path), device="cpu")


def test_tokenizer_without_pad_or_eos_is_refused(tmp_path: Path) -> None:
    """With neither a pad nor an eos token there is nothing safe to pad with."""
    from transformers import PreTrainedTokenizerFast

    bare = build_bos_tokenizer()
    make = cast(Any, PreTrainedTokenizerFast)  # its __init__ is unannotated
    make(tokenizer_object=bare.backend_tokenizer).save_pretrained(tmp_path)
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="neither a pad nor an eos"):
        load_model(str(tmp_path), device="cpu")


def test_tokenizer_larger_than_embeddings_is_refused(
    tmp_path: Path, gpt2_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Token ids past the embedding table would crash later: refuse at load time."""
    tiny_gpt2(vocab_size=64).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="50257 tokens but the model's embedding has only 64"):
        load_model(str(tmp_path), device="cpu")


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto falls back to CPU; cuda without CUDA and unknown names are errors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ModelLoadError) as info:
            resolve_device(name)
        _assert_one_line(info.value, f"'{name}'", "CUDA is not available")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ModelLoadError, match="1 CUDA device"):
        resolve_device("cuda:3")


def test_load_model_with_cuda_but_no_cuda(monkeypatch: pytest.MonkeyPatch, gpt2_dir: Path) -> None:
    """device='cuda' on a machine without CUDA fails clearly before loading anything."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(str(gpt2_dir), device="cuda")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_resolve_dtype_names(name: str, dtype: torch.dtype) -> None:
    """Each documented alias maps to its dtype."""
    assert resolve_dtype(name, torch.device("cpu")) is dtype


def test_resolve_dtype_auto_and_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto is float32 on CPU, bf16 on CUDA when supported (else fp16); unknown is an error."""
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_hub_ids_and_paths_are_told_apart() -> None:
    """'org/name' is a hub id; absolute, relative and deeper paths are folders."""
    looks = loading._looks_like_path
    assert not looks("gpt2") and not looks("openai-community/gpt2")
    assert looks("/models/x") and looks("./x") and looks("~/x") and looks("a/b/c")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda(gpt2_dir: Path) -> None:
    """On a GPU, auto picks CUDA and a supported low-precision dtype."""
    loaded = load_model(str(gpt2_dir), device="auto", dtype="auto")
    assert loaded.device.type == "cuda"
    assert next(loaded.model.parameters()).device.type == "cuda"
    assert loaded.dtype in (torch.bfloat16, torch.float16)


def test_cache_id_is_the_same_however_the_folder_is_written(
    gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caches (covariance statistics, locate) key on it: a relative path must not miss
    the cache an absolute one wrote."""
    monkeypatch.chdir(gpt2_dir.parent)
    relative = load_model(gpt2_dir.name, device="cpu")
    absolute = load_model(str(gpt2_dir.resolve()), device="cpu")
    assert relative.name_or_path != absolute.name_or_path
    assert relative.cache_id == absolute.cache_id == str(gpt2_dir.resolve())
    named = LoadedModel(**{**vars(absolute), "name_or_path": "org/not-a-folder"})
    assert named.cache_id == "org/not-a-folder"
