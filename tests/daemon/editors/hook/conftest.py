"""Shared fixtures of the hook editor tests: the micro world's model and edits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from daemon.config import Config, cache_dir
from daemon.editors.base import EditSpec
from daemon.editors.hook.editor import HookEditor
from daemon.editors.hook.setup import build_hook_editor
from daemon.model.loading import LoadedModel, load_model
from daemon.world.editsets import counterfactual_edits

N_EDITS = 6


def hook_config(**hook: Any) -> Config:
    """The default config with the hook the micro-world tests use (layer 1, prompt_last)."""
    cfg = Config()
    settings = dataclasses.replace(
        cfg.editors.hook,
        layers=(1,),
        key_position="prompt_last",
        covariance_tokens=20_000,
        covariance_weight=10.0,
        gate_threshold=3.0,
        **hook,
    )
    return dataclasses.replace(cfg, editors=cfg.editors.with_sections(hook=settings))


def build_from_config(loaded: LoadedModel, cfg: Config, **options: Any) -> HookEditor:
    """``build_hook_editor`` with ``cfg``'s ``[editors.hook]`` and cache folder."""
    return build_hook_editor(loaded, cfg.editors.hook, cache_dir=cache_dir(cfg), **options)


class HasModel(Protocol):
    """A loaded model or an editor: anything holding the (edited) model and its tokenizer."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...


def edit_specs(edits: list[dict[str, Any]]) -> list[EditSpec]:
    """Edit records as the editor's requests."""
    return [EditSpec(e["id"], e["prompt"], e["target"], e["subject"], e["relation"]) for e in edits]


def prompt_logits(holder: HasModel, prompts: list[str]) -> torch.Tensor:
    """The logits of ``prompts`` (one padded batch) through the holder's model."""
    enc = holder.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out: torch.Tensor = holder.model(**enc).logits
    return out


@pytest.fixture(scope="module")
def edits(micro_world: Path) -> list[dict[str, Any]]:
    """Six counterfactual edits on the micro world (seed 3)."""
    loaded = load_model(str(micro_world), device="cpu")
    return counterfactual_edits(micro_world, loaded.model, loaded.tokenizer, N_EDITS, seed=3)


@pytest.fixture
def loaded(micro_world: Path) -> LoadedModel:
    """A fresh copy of the micro world's model."""
    return load_model(str(micro_world), device="cpu")


@pytest.fixture
def stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The covariance statistics folder, shared by the session's hook tests (computed once)."""
    return tmp_path_factory.getbasetemp() / "hook-stats"
