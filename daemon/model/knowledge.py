"""What editd knows about a model beyond its weights, from the installed model sources.

Model sources are plugins under the ``editd.model_sources`` entry-point group
(``pyproject.toml`` registers the fact world's, :class:`daemon.world.source.WorldSource`):
each makes the models whose names start with its ``prefix`` and knows, for the models
it made, the facts they state exactly, the text they were trained on and prompts to
watch for drift (:class:`ModelKnowledge`). Editors and the drift check ask
:func:`knowledge_of` and fall back to the shipped common facts and Wikipedia passages
for any other model; :mod:`daemon.model.source` asks :func:`claimant` to make a model
by name. Neither knows the fact world.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from daemon.facts import FactSet

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

    def resolve(self, name: str, cache_dir: Path, *, threads: int, progress: bool) -> Path:
        """The folder of the model called ``name``, made once into ``cache_dir`` (with
        ``threads`` CPU threads) and reused."""
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


def claimant(name: str) -> ModelSource | None:
    """The installed source whose prefix ``name`` starts with, if any."""
    return next((s for s in model_sources() if name.startswith(s.prefix)), None)


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
