"""The base task: does the model still know the facts no edit touched?

For a fact-world model (a folder with ``world.json``) this is greedy
exact-match accuracy on facts of the ``probe`` split (never used for edits),
prompted with their first training template and excluding any subject the edit
stream touches. Other models have no base task here (``None``).
"""

from __future__ import annotations

import random
from collections.abc import Collection
from pathlib import Path

from daemon.facts import fill

WORLD_FILE = "world.json"


def world_base_task(
    model_dir: Path, *, exclude_subjects: Collection[str] = (), n: int = 200, seed: int = 0
) -> list[tuple[str, str]] | None:
    """Up to ``n`` (prompt, true target) pairs from untouched facts, or None if not a world."""
    if not (model_dir / WORLD_FILE).is_file():
        return None
    from daemon.world.build import load_world

    world = load_world(model_dir)
    excluded = set(exclude_subjects)
    pool = [i for i in world.splits.get("probe", ()) if world.facts[i].subject not in excluded]
    chosen = sorted(random.Random(f"editd-base-task-{seed}").sample(pool, min(n, len(pool))))
    out = []
    for i in chosen:
        fact = world.facts[i]
        template = world.relation(fact.relation).train_templates[0]
        out.append((fill(template, fact.subject), fact.target))
    return out
