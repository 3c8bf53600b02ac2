"""The daemon's serving side in-process: measured streams, chat rendering, model info."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_config
from daemon.engine.completions import CompletionRequest, collect
from daemon.service.daemon import Daemon
from tests.daemon.service.conftest import write_config

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def daemon(tmp_path: Path, micro_world: Path) -> Iterator[Daemon]:
    """A started daemon (MELO only, no scheduler) whose chat template is a file."""
    (tmp_path / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    config = load_config(
        write_config(
            tmp_path,
            micro_world,
            scheduler={"enabled": False},
            router={"backends": ["melo"], "default_backend": "melo"},
            api={"chat_template": "chat.jinja"},
        )
    )
    started = Daemon(config)
    started.start()
    try:
        yield started
    finally:
        started.stop(checkpoint=False)


def sample(daemon: Daemon, name: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_a_closed_stream_frees_the_engine_and_is_counted_as_cancelled(daemon: Daemon) -> None:
    request = CompletionRequest(prompts=("The capital of Vonmark is", "Shus Fismou is"))
    deltas = daemon.stream(request)
    next(deltas)
    engine = daemon.live_engine()
    assert engine.lock.held()
    deltas.close()
    assert not engine.lock.held()
    assert sample(daemon, "editd_completions_cancelled_total") == 1.0
    whole = daemon.complete(request)
    assert collect(request, daemon.stream(request)) == whole
    assert sample(daemon, "editd_completions_cancelled_total") == 1.0
    assert sample(daemon, "editd_completion_seconds_count") == 3.0
    generated = sum(c.usage["completion_tokens"] for c in whole) * 2
    assert sample(daemon, "editd_completion_tokens_total") >= generated
    assert sample(daemon, "editd_completion_first_token_seconds_count") == 3.0


def test_chat_uses_the_configured_template_file(daemon: Daemon) -> None:
    messages = [{"role": "user", "content": "Where is Vonmark?"}]
    assert daemon.render_chat(messages) == "<user>Where is Vonmark?\n<assistant>"


def test_model_info_follows_the_applied_edits(
    daemon: Daemon, world_edits: list[dict[str, Any]]
) -> None:
    before = daemon.model_info()
    assert before["applied_edits"] == 0 and before["loaded_at"] is not None
    assert daemon.model_name() == before["name_or_path"]
    (result,) = daemon.submit([dict(world_edits[0])])
    deadline = time.monotonic() + 120
    while daemon.get_edit(result.id).status.value != "applied":
        assert time.monotonic() < deadline, daemon.get_edit(result.id)
        time.sleep(0.05)
    after = daemon.model_info()
    assert after["applied_edits"] == 1 and after["applied_by_backend"] == {"melo": 1}
    assert after["watermark"] > before["watermark"]
