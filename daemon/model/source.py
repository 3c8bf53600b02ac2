"""From ``[model]`` config to a loaded model: resolves ``world:`` names, sets threads.

``name_or_path = "world:SIZE"`` or ``"world:SIZE-ARCH"`` (e.g. ``world:small``,
``world:micro-gpt2``) names the embedded fact-world model; it is built once into
``world_cache`` and then loaded through the same ``from_pretrained`` path as any
user model. A ``.gguf`` file is imported once into ``import_cache``
(:mod:`daemon.model.gguf`). Anything else is passed to ``load_model`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daemon.config import ModelConfig
from daemon.errors import ModelLoadError
from daemon.model.loading import LoadedModel, load_model

WORLD_PREFIX = "world:"


def parse_world_name(name: str) -> tuple[str, str] | None:
    """``world:small-gpt2`` → ``("small", "gpt2")``; ``None`` for other names."""
    if not name.startswith(WORLD_PREFIX):
        return None
    size, _, arch = name[len(WORLD_PREFIX) :].partition("-")
    if not size:
        raise ModelLoadError(f"'{name}': expected world:SIZE or world:SIZE-ARCH")
    return size, arch or "llama"


def resolve_model_source(cfg: ModelConfig, *, progress: bool = True) -> str:
    """The folder or name to load: a ``world:`` name is built (once) and cached, a
    ``.gguf`` file is imported (once) into ``import_cache``."""
    if cfg.name_or_path.lower().endswith(".gguf"):
        from daemon.model.gguf import cached_import

        return str(cached_import(Path(cfg.name_or_path), cfg.import_cache))
    parsed = parse_world_name(cfg.name_or_path)
    if parsed is None:
        return cfg.name_or_path
    from daemon.world.build import cached_world  # imports training code only when needed

    size, arch = parsed
    folder = cached_world(
        cfg.world_cache, size, arch, threads=max(1, cfg.threads), progress=progress
    )
    return str(folder)


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
