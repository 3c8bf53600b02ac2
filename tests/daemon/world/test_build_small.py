"""The small world (demo and benchmarks) reaches the accuracy bar: slow, ~5 min on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.world.build import build_world


@pytest.mark.slow
def test_small_llama_world_knows_its_facts(tmp_path: Path) -> None:
    """>= 95% greedy exact match on training-template prompts, in under 15 minutes."""
    report = build_world(tmp_path / "small", size="small", arch="llama", progress=False)
    assert report.ready
    assert report.n_facts >= 2000
    assert report.train_accuracy >= 0.95
    assert report.seconds < 15 * 60
