"""A third back-end, added by one registry entry, goes the daemon's whole way: its config
section is parsed, requests may name it, the router sends edits to it, the worker
applies and verifies them, the store records it, metrics label it, a checkpoint saves
its state and a restart restores it, and retracting an edit takes it back out.

The toy back-end forces the edited answer: while a prompt it holds is generated, a hook
on the output layer makes each next token the target's. That is a real (if blunt) edit
of the live model, so verification by greedy generation passes or fails for real.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from daemon.api.server import ApiServer
from daemon.config import load_config
from daemon.config_fields import positive
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.registry import BackendEntry, EditorContext, register, unregister
from daemon.errors import ConfigError, EditorStateError
from daemon.model.batches import target_token_ids
from daemon.model.loading import LoadedModel
from daemon.service.daemon import Daemon
from daemon.service.serve import bind_socket
from store.schema import Backend
from tests.daemon.service.conftest import write_config

FORCED = Backend("forced")


@dataclass(frozen=True)
class ForcedConfig:
    """``[editors.forced]``."""

    capacity: int = 8

    def __post_init__(self) -> None:
        positive(self, "capacity")


class ForcedAnswers:
    """Holds (prompt, target) pairs; generating a held prompt yields its target."""

    name = "forced"

    def __init__(self, loaded: LoadedModel, cfg: ForcedConfig) -> None:
        self.tokenizer = loaded.tokenizer
        self.capacity = cfg.capacity
        self.edits: dict[str, tuple[str, str]] = {}
        self._rows: list[list[int] | None] | None = None
        self._step = 0
        head = loaded.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        assert head is not None
        head.register_forward_hook(self._force)

    @property
    def reads_subjects(self) -> bool:
        return False

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        out = []
        for spec in edits:
            held = {prompt for prompt, _ in self.edits.values()}
            if len(self.edits) >= self.capacity:
                out.append(EditOutcome(spec.edit_id, False, f"full ({self.capacity} edits)"))
            elif spec.prompt in held:
                out.append(EditOutcome(spec.edit_id, False, "another edit holds this prompt"))
            else:
                self.edits[spec.edit_id] = (spec.prompt, spec.target)
                out.append(EditOutcome(spec.edit_id, True))
        return out

    def retract(self, edit_ids: Sequence[str]) -> None:
        for edit_id in edit_ids:
            self.edits.pop(edit_id, None)

    def applied_ids(self) -> list[str]:
        return list(self.edits)

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return self._routing(list(prompts))

    @contextmanager
    def _routing(self, prompts: list[str]) -> Iterator[None]:
        answers = {p: target_token_ids(self.tokenizer, p, t) for p, t in self.edits.values()}
        self._rows, self._step = [answers.get(p) for p in prompts], 0
        try:
            yield
        finally:
            self._rows = None

    def _force(self, _module: Any, _args: Any, logits: torch.Tensor) -> torch.Tensor | None:
        rows = self._rows
        if rows is None or not any(rows):
            return None
        step, self._step = self._step, self._step + 1
        forced = logits.clone()
        for row, ids in enumerate(rows):
            if ids is not None and step < len(ids):
                forced[row, -1, :] = torch.finfo(forced.dtype).min
                forced[row, -1, ids[step]] = 0.0
        return forced

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "edits": [[i, p, t] for i, (p, t) in self.edits.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise EditorStateError(f"forced: unknown state version {state.get('version')!r}")
        self.edits = {i: (p, t) for i, p, t in state["edits"]}


def _build(loaded: LoadedModel, cfg: ForcedConfig, _context: EditorContext) -> Editor:
    return ForcedAnswers(loaded, cfg)


@pytest.fixture
def forced_backend() -> Iterator[BackendEntry]:
    entry = register(BackendEntry(FORCED, ForcedConfig, _build, order=2, summary="toy"))
    try:
        yield entry
    finally:
        unregister(FORCED)


class Served:
    """A daemon in this process behind the real HTTP front end on a loopback port."""

    def __init__(self, config: Path) -> None:
        self.daemon = Daemon(load_config(config))
        sock: socket.socket = bind_socket("127.0.0.1", 0)
        self.server = ApiServer(self.daemon, self.daemon.config.api)
        self.thread = threading.Thread(target=self.server.run, args=([sock],), daemon=True)
        self.thread.start()
        self.daemon.start()
        port = sock.getsockname()[1]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def settled(self, edit_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record: dict[str, Any] = self.http.get(f"/v1/edits/{edit_id}").json()
            if record["status"] not in ("queued", "applying"):
                return record
            time.sleep(0.05)
        raise AssertionError(f"{edit_id} did not settle")

    def answer(self, prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
        reply = self.http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        text: str = reply.json()["choices"][0]["text"]
        return text

    def close(self, *, checkpoint: bool) -> None:
        self.daemon.stop(checkpoint=checkpoint)
        self.server.stop()
        self.thread.join(timeout=30)
        self.http.close()


def test_a_registered_third_backend_is_routed_applied_persisted_and_retracted(
    forced_backend: BackendEntry,
    micro_world: Path,
    world_edits: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """One registry entry is all the daemon needs to serve a new back-end."""
    config = write_config(
        tmp_path,
        micro_world,
        router={"backends": ["forced"], "default_backend": "forced"},
        editors__forced={"capacity": 3},
        scheduler={"enabled": False},
    )
    named, routed, unrelated = (dict(e) for e in world_edits[:3])
    named["backend"] = "forced"
    served = Served(config)
    try:
        before = served.answer(unrelated["prompt"])
        reply = served.http.post("/v1/edits", json={"edits": [named, routed]})
        assert reply.status_code == 202, reply.text
        for edit, reason in ((named, "requested by the client"), (routed, "default_backend")):
            record = served.settled(edit["id"])
            assert record["status"] == "applied", record
            assert record["backend"] == "forced"
            assert reason in record["result"]["route"]["reason"]
            assert served.answer(edit["prompt"]).startswith(edit["target"])
        assert served.answer(unrelated["prompt"]) == before

        status = served.http.get("/v1/status").json()
        assert status["backends"] == ["forced"]
        assert status["applied_by_backend"] == {"forced": 2}
        metrics = served.http.get("/metrics").text
        assert 'editd_edits{backend="forced",state="applied"} 2.0' in metrics

        bad = served.http.post("/v1/edits", json={"edits": [{**unrelated, "backend": "nope"}]})
        (result,) = bad.json()["results"]
        assert result["status"] == "rejected"
        assert "'forced'" in result["reason"] and "'nope'" in result["reason"]

        made = served.http.post("/v1/checkpoints", json={})
        assert made.status_code in (200, 201), made.text
    finally:
        served.close(checkpoint=False)

    again = Served(config)
    try:
        report = again.daemon.restore_report
        assert report is not None and report.from_checkpoint == 2
        assert report.reconcile.replayed == 0  # the editor's own state came back
        for edit in (named, routed):
            assert again.answer(edit["prompt"]).startswith(edit["target"])
        gone = again.http.delete(f"/v1/edits/{named['id']}", params={"reason": "test"})
        assert gone.status_code == 200, gone.text
        assert gone.json()["status"] == "retracted"
        assert not again.answer(named["prompt"]).startswith(named["target"])
        assert again.answer(routed["prompt"]).startswith(routed["target"])
    finally:
        again.close(checkpoint=False)


def test_a_registered_backend_has_a_validated_config_section(
    forced_backend: BackendEntry, micro_world: Path, tmp_path: Path
) -> None:
    """``[editors.forced]`` is parsed into the entry's config class with its checks; an
    unregistered section or back-end name is a config error naming the registered ones."""
    ok = load_config(write_config(tmp_path / "a", micro_world, editors__forced={"capacity": 2}))
    assert ok.editors.section("forced") == ForcedConfig(capacity=2)
    with pytest.raises(ConfigError, match=r"editors\.forced\.capacity"):
        load_config(write_config(tmp_path / "b", micro_world, editors__forced={"capacity": 0}))
    with pytest.raises(ConfigError, match="registered: hook, melo, forced"):
        load_config(write_config(tmp_path / "c", micro_world, editors__rome={"layers": [1]}))
    with pytest.raises(ConfigError, match=r"router\.backends"):
        load_config(write_config(tmp_path / "d", micro_world, router={"backends": ["rome"]}))
