"""Forget and behaviour edits in a real daemon on the micro world: what verification
checks, what the record keeps, that a retraction restores the base model's outputs
exactly, and that the API and the CLI list edits by kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fastapi.testclient import TestClient

from daemon.api.app import create_app
from daemon.cli.app import cli
from daemon.config import load_config
from daemon.engine.kinds import answer_of
from daemon.model.answers import continuation_matches, reply_mentions
from daemon.service.daemon import Daemon
from tests.daemon.service.conftest import settle, write_config


def test_a_forget_withholds_the_models_answer_and_its_retraction_restores_it(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    daemon = make_daemon()
    engine = daemon.engine
    fact = world_edits[0]
    probes = [fact["prompt"], *fact.get("rephrases", [])]
    base = engine.greedy(probes, 8)
    said = " " + answer_of(engine.greedy([fact["prompt"]], engine.kinds.answer_tokens)[0])
    assert said.strip()  # the micro world's model answers its own facts
    daemon.submit(
        [{"id": "g1", "kind": "forget", "prompt": fact["prompt"], "subject": fact["subject"]}]
    )
    settle(daemon)
    record = daemon.get_edit("g1")
    assert record.status.value == "applied", record.error
    assert record.kind.value == "forget"
    assert record.request is not None and record.request.target == " [withheld]"
    assert record.result is not None
    assert record.result["withheld"] == said
    verification = record.result["verification"]
    assert verification["passed"] and verification["withheld"] == said
    assert not reply_mentions(engine.greedy([fact["prompt"]], 8)[0], said)

    daemon.retract("g1", "test")
    assert engine.greedy(probes, 8) == base


def test_behaviour_edits_and_the_target_limit_and_listing_by_kind(
    make_daemon: Any, world_edits: list[dict[str, Any]]
) -> None:
    daemon = make_daemon(kinds={"max_target_tokens": 16})
    identity = {
        "id": "who",
        "kind": "behaviour",
        "prompt": "Who are you? Answer:",
        # words the micro world's model can say (its vocabulary is its facts')
        "target": world_edits[2]["target"] + world_edits[3]["target"],
    }
    too_long = {
        "id": "long",
        "kind": "behaviour",
        "prompt": "Say something long:",
        "target": " one two three four five six seven eight nine ten",
    }
    daemon.submit([identity, too_long, {**world_edits[1], "id": "fact"}])
    settle(daemon)
    assert daemon.get_edit("who").status.value == "applied"
    assert continuation_matches(
        daemon.engine.greedy([identity["prompt"]], 5)[0], identity["target"]
    )
    failed = daemon.get_edit("long")
    assert failed.status.value == "failed"
    assert "max_target_tokens" in (failed.error or "")

    client = TestClient(create_app(daemon, daemon.config.api), base_url="http://127.0.0.1")
    client.headers["Authorization"] = f"Bearer {daemon.config.api.token}"
    page = client.get("/v1/edits", params={"kind": "behaviour"}).json()
    assert [e["id"] for e in page["edits"]] == ["who", "long"]
    assert {e["kind"] for e in page["edits"]} == {"behaviour"}
    assert client.get("/v1/edits", params={"kind": "nonsense"}).status_code == 422

    assert daemon.config.source is not None
    out = CliRunner().invoke(
        cli, ["--config", str(daemon.config.source), "edits", "list", "--kind", "fact", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert [e["id"] for e in json.loads(out.output)] == ["fact"]


def test_a_forget_survives_a_restart_from_checkpoint_and_without_one(
    micro_world: Path, tmp_path: Path, world_edits: list[dict[str, Any]]
) -> None:
    """Checkpointed or replayed from the store, a forget comes back as it was verified:
    its answer stays absent (the replay checks the answer the record kept)."""
    fact = world_edits[5]
    config = write_config(tmp_path, micro_world, scheduler={"enabled": False})
    first = Daemon(load_config(config))
    first.start()
    try:
        first.submit(
            [{"id": "g", "kind": "forget", "prompt": fact["prompt"], "subject": fact["subject"]}]
        )
        settle(first)
        withheld = first.get_edit("g").result["withheld"]  # type: ignore[index]
        edited = first.live_engine().greedy([fact["prompt"]], 8)
    finally:
        first.stop(checkpoint=True)
    for keep_checkpoint in (True, False):
        if not keep_checkpoint:
            shutil.rmtree(tmp_path / "var" / "checkpoints")
        again = Daemon(load_config(config))
        again.start()
        try:
            assert "g" in [i for ids in again.live_engine().applied_ids().values() for i in ids]
            assert again.live_engine().greedy([fact["prompt"]], 8) == edited
            assert not reply_mentions(edited[0], withheld)
            assert again.get_edit("g").status.value == "applied"
        finally:
            again.stop(checkpoint=False)
