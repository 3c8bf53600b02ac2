"""The engine lock with real threads: a waiting batch goes before further completion
prompts, so it never waits behind a queue of completion requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.editors.base import Editor
from daemon.editors.registry import HOOK
from daemon.engine.completions import CompletionChoice, CompletionRequest
from daemon.engine.engine import Engine, EngineLock
from daemon.model.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def loaded(micro_world: Path) -> LoadedModel:
    return load_model(str(micro_world), device="cpu")


class RoutingLog:
    """Only the routing part of an editor: remembers when each forward context opened."""

    def __init__(self) -> None:
        self.opened: list[float] = []

    @contextmanager
    def routing(self, prompts: Sequence[str]) -> Iterator[None]:
        self.opened.append(time.monotonic())
        yield


def start(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_waiting_batch_goes_between_the_prompts_of_a_completion(loaded: LoadedModel) -> None:
    """A 32-prompt completion is under way; a batch (``with engine.lock``) that starts
    waiting gets the lock after the current prompt, and the completion resumes after it."""
    routing = RoutingLog()
    engine = Engine(loaded, {HOOK: cast(Editor, routing)})
    prompts = tuple(f"The capital of Vonmark is{' the' * (i % 4)}" for i in range(32))
    request = CompletionRequest(prompts=prompts, max_tokens=12, temperature=0)
    out: list[list[CompletionChoice]] = []
    completion = start(lambda: out.append(engine.complete(request)))
    wait_for(lambda: len(routing.opened) >= 1)
    with engine.lock:  # the worker's batch
        got_it = time.monotonic()
        opened_before = len(routing.opened)
        time.sleep(0.05)
        assert len(routing.opened) == opened_before  # nothing ran while the batch held it
    completion.join(timeout=60)
    assert len(out[0]) == 32
    assert opened_before < 32
    assert any(t > got_it for t in routing.opened)  # the completion went on afterwards


def test_completion_turns_wait_for_every_waiting_holder() -> None:
    """Holder H has the lock; B waits in ``with lock``; then C asks for a completion turn.
    When H lets go, B goes first although both were waiting."""
    lock = EngineLock()
    order: list[str] = []
    release_h = threading.Event()

    def holder() -> None:
        with lock:
            release_h.wait(10)
        order.append("H")

    def batch() -> None:
        with lock:
            order.append("B")

    def completion() -> None:
        with lock.after_waiting():
            order.append("C")

    threads = [start(holder)]
    wait_for(lock.held)
    threads.append(start(batch))
    wait_for(lambda: lock.waiting == 1)
    threads.append(start(completion))
    time.sleep(0.05)
    release_h.set()
    for t in threads:
        t.join(timeout=10)
    assert order.index("B") < order.index("C")


def test_the_lock_is_reentrant_both_ways() -> None:
    """A holder re-enters either way (verification inside a batch, nested routines)."""
    lock = EngineLock()
    with lock, lock.after_waiting(), lock:
        assert lock.held()
    assert not lock.held()
    with lock.after_waiting(), lock:
        pass
    assert not lock.held()
    with pytest.raises(RuntimeError):
        lock.release()
