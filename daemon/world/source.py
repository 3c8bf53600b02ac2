"""The fact world as a model source: ``world:SIZE`` / ``world:SIZE-ARCH`` names, and what
editd knows of a world model (registered in ``pyproject.toml`` under the
``editd.model_sources`` entry points; see :mod:`daemon.model.knowledge`).

``world:small`` or ``world:micro-gpt2`` names the embedded fact-world model; it is built
once into ``[model] world_cache`` and then loaded like any folder. A folder holding a
``world.json`` (a built world) is known exactly: its facts, its training corpus, and
probe prompts drawn from its ``probe`` split, which no edit set uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ModelLoadError
from daemon.world.build import WORLD_FILE, cached_world, load_world
from daemon.world.editsets import probe_prompts
from daemon.world.facts import World

PREFIX = "world:"


def parse_world_name(name: str) -> tuple[str, str]:
    """``world:small-gpt2`` → ``("small", "gpt2")`` (the architecture defaults to llama)."""
    if not name.startswith(PREFIX):
        raise ModelLoadError(f"'{name}' is not a world name (world:SIZE or world:SIZE-ARCH)")
    size, _, arch = name[len(PREFIX) :].partition("-")
    if not size:
        raise ModelLoadError(f"'{name}': expected world:SIZE or world:SIZE-ARCH")
    return size, arch or "llama"


@dataclass(frozen=True)
class WorldKnowledge:
    """A built world model's facts, corpus and probe prompts."""

    world: World

    @property
    def facts(self) -> World:
        return self.world

    def corpus(self) -> list[str]:
        return self.world.training_corpus()

    def probe_prompts(self, n: int, *, seed: int = 0) -> list[str]:
        return probe_prompts(self.world, n, seed=seed)


class WorldSource:
    """Builds ``world:`` models and knows the folders that hold a ``world.json``."""

    prefix = PREFIX

    def resolve(self, name: str, cache_dir: Path, *, threads: int, progress: bool) -> Path:
        size, arch = parse_world_name(name)
        return cached_world(cache_dir, size, arch, threads=threads, progress=progress)

    def knowledge(self, folder: Path) -> WorldKnowledge | None:
        if not (folder / WORLD_FILE).is_file():
            return None
        return WorldKnowledge(load_world(folder))
