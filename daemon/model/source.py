"""From ``[model]`` config to a loaded model, and what editd knows about a model.

``name_or_path`` is resolved in this order:

1. a ``.gguf`` file is imported once into ``import_cache`` (:mod:`daemon.model.gguf`);
2. a name a **model source** claims (its ``prefix``, e.g. ``world:small``) is made by
   that source: the embedded fact-world models are built once into ``world_cache``;
3. anything else is passed to ``load_model`` unchanged (a folder or a hub name).

Model sources are plugins found under the ``editd.model_sources`` entry-point group
(``pyproject.toml`` registers the fact world's, :class:`daemon.world.source.WorldSource`),
so this layer builds world models without importing the world. A source also says
what it knows about the models it made (:class:`ModelKnowledge`): the facts they state
exactly, the text they were trained on and prompts to watch for drift. Editors and the
drift check ask :func:`knowledge_of` and fall back to the shipped common facts and
Wikipedia passages for any other model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

import torch

from daemon.config import ModelConfig
from daemon.errors import ModelLoadError
from daemon.facts import FactSet
from daemon.model.loading import LoadedModel, load_model

ENTRY_POINT_GROUP = "editd.model_sources"


class ModelKnowledge(Protocol):
    """What editd knows about a model beyond its weights."""

    @property
    def facts(self) -> FactSet:
        """Labelled facts the model states exactly (locate and calibrate on these)."""
        ...

    def corpus(self) -> list[str]:
        """The text the model was trained on (key statistics come from it)."""
        ...

    def probe_prompts(self, n: int, *, seed: int = 0) -> list[str]:
        """Prompts about facts no edit will touch (drift probes), at most ``n``."""
        ...


class ModelSource(Protocol):
    """A plugin that makes the models whose names start with ``prefix``."""

    prefix: str

    def resolve(self, name: str, cfg: ModelConfig, *, progress: bool) -> Path:
        """The folder of the model called ``name`` (made and cached if needed)."""
        ...

    def knowledge(self, folder: Path) -> ModelKnowledge | None:
        """What this source knows of the model in ``folder``; None if it did not make it."""
        ...


@cache
def model_sources() -> tuple[ModelSource, ...]:
    """The installed model sources (read once per process)."""
    found: list[ModelSource] = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        factory: Callable[[], ModelSource] = point.load()
        found.append(factory())
    return tuple(found)


def _claimant(name: str, sources: Sequence[ModelSource]) -> ModelSource | None:
    return next((s for s in sources if name.startswith(s.prefix)), None)


def resolve_model_source(cfg: ModelConfig, *, progress: bool = True) -> str:
    """The folder or name to load: a ``.gguf`` file is imported (once) into
    ``import_cache``, a name a model source claims is made (once) by it."""
    if cfg.name_or_path.lower().endswith(".gguf"):
        from daemon.model.gguf import cached_import

        return str(cached_import(Path(cfg.name_or_path), cfg.import_cache))
    source = _claimant(cfg.name_or_path, model_sources())
    if source is not None:
        return str(source.resolve(cfg.name_or_path, cfg, progress=progress))
    if ":" in cfg.name_or_path.split("/")[0] and not Path(cfg.name_or_path).exists():
        prefixes = ", ".join(f"'{s.prefix}'" for s in model_sources()) or "none installed"
        raise ModelLoadError(
            f"'{cfg.name_or_path}': no model source claims this name (sources: {prefixes}; "
            "is editd installed with `pip install -e .`?)"
        )
    return cfg.name_or_path


def knowledge_of(name_or_path: str | Path) -> ModelKnowledge | None:
    """What the installed model sources know of the model loaded from ``name_or_path``."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    for source in model_sources():
        known = source.knowledge(folder)
        if known is not None:
            return known
    return None


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
