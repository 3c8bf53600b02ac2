"""Fixtures for the store tests: a fake clock, an open store, a queue on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store.db import Store
from store.queue import EditQueue, QueuePolicy
from tests.store.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at t = 1,000,000 s."""
    return FakeClock()


@pytest.fixture
def store(store_path: Path, clock: FakeClock) -> Iterator[Store]:
    """A fresh store file on the fake clock."""
    with Store.open(store_path, clock=clock) as st:
        yield st


@pytest.fixture
def queue(store: Store) -> EditQueue:
    """A queue with the default policy (3 attempts, 2 s back-off base, 300 s cap)."""
    return EditQueue(store, QueuePolicy())
