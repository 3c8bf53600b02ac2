"""From ``[model]`` config to a loaded model.

``name_or_path`` is resolved in this order:

1. a ``.gguf`` file is imported once into ``import_cache`` (:mod:`daemon.model.gguf`);
2. a name a **model source** claims (its ``prefix``, e.g. ``world:small``) is made by
   that source: the embedded fact-world models are built once into ``world_cache``;
3. anything else is passed to ``load_model`` unchanged (a folder or a hub name).

Model sources are plugins (:mod:`daemon.model.knowledge`), so this layer builds world
models without importing the world.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.config import ModelConfig
from daemon.errors import ModelLoadError
from daemon.model.knowledge import claimant, model_sources
from daemon.model.loading import LoadedModel, load_model


def resolve_model_source(cfg: ModelConfig, *, progress: bool = True) -> str:
    """The folder or name to load: a ``.gguf`` file is imported (once) into
    ``import_cache``, a name a model source claims is made (once) by it."""
    if cfg.name_or_path.lower().endswith(".gguf"):
        from daemon.model.gguf import cached_import

        return str(cached_import(Path(cfg.name_or_path), cfg.import_cache))
    source = claimant(cfg.name_or_path)
    if source is not None:
        folder = source.resolve(
            cfg.name_or_path, cfg.world_cache, threads=max(1, cfg.threads), progress=progress
        )
        return str(folder)
    if ":" in cfg.name_or_path.split("/")[0] and not Path(cfg.name_or_path).exists():
        prefixes = ", ".join(f"'{s.prefix}'" for s in model_sources()) or "none installed"
        raise ModelLoadError(
            f"'{cfg.name_or_path}': no model source claims this name (sources: {prefixes}; "
            "is editd installed with `pip install -e .`?)"
        )
    return cfg.name_or_path


def apply_threads(threads: int) -> None:
    """Set torch's CPU thread count (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def load_configured_model(cfg: ModelConfig, *, progress: bool = True) -> LoadedModel:
    """Resolve, then load, the configured model."""
    apply_threads(cfg.threads)
    source = resolve_model_source(cfg, progress=progress)
    return load_model(
        source, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
