"""A real facade for the API tests: a SQLite store, the edit queue and the micro world model.

Nothing is mocked: edits go through :class:`store.queue.EditQueue` into a fresh
SQLite file, completions through :func:`daemon.engine.completions.stream` on the
micro fact-world model (with a routing that records the prompts it was given, under
a real :class:`~daemon.engine.engine.EngineLock`), chat through
:func:`daemon.model.chat.render_chat` with :data:`CHAT_TEMPLATE` (the micro world's
tokenizer has no template of its own).
``make_server`` serves an app as ``editd serve`` does (uvicorn with the connection
limits of :mod:`daemon.api.server`) on a free 127.0.0.1 port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from daemon.api.app import create_app
from daemon.api.errors import is_openai_path
from daemon.api.facade import DaemonFacade
from daemon.api.server import http_server
from daemon.config import ApiConfig, Config
from daemon.engine.completions import (
    CompletionChoice,
    CompletionDelta,
    CompletionRequest,
    collect,
    stream,
)
from daemon.engine.engine import EngineLock
from daemon.errors import DriftDisabledError, RecordNotFoundError
from daemon.feeds.poller import FeedPoller
from daemon.model.chat import render_chat
from daemon.service.serve import bind_socket
from store.db import Store
from store.edits import EditRecord
from store.feeds import feed_states
from store.intake import EnqueueResult
from store.queue import EditQueue
from store.schema import EditKind, EditStatus, SourceKind

TOKEN = "s3cret-token-for-the-tests"
MODEL_NAME = "micro-world"
"""The facade's ``[model] name_or_path`` (not a path: it is served under this id)."""
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
JSON = {"Content-Type": "application/json"}
"""The header every POST needs, also one without a body."""


@dataclass(frozen=True)
class WorldModel:
    """The micro world's model and tokenizer, loaded once per session."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class RecordingRouting:
    """A routing that does nothing but remember the prompts of every context it opened."""

    calls: list[tuple[str, ...]] = field(default_factory=list)

    @contextmanager
    def __call__(self, prompts: Sequence[str]) -> Iterator[None]:
        self.calls.append(tuple(prompts))
        yield


class StoreFacade:
    """A :class:`~daemon.api.facade.DaemonFacade` over a real store and the micro model."""

    def __init__(self, store: Store, world: WorldModel) -> None:
        self.store = store
        self.queue = EditQueue(store)
        self.world = world
        self.routing = RecordingRouting()
        self.lock = EngineLock()
        self.chat_template: str | None = CHAT_TEMPLATE
        self.ready = True
        self.checkpoints = 0
        self.nightly_triggers: list[str] = []
        self.registry = CollectorRegistry()
        self.requests = Counter("editd_test_calls", "Facade calls.", registry=self.registry)

    def submit(self, raws: Sequence[object]) -> list[EnqueueResult]:
        self.requests.inc()
        return self.queue.submit_many(raws, source_kind=SourceKind.API)

    def get_edit(self, edit_id: str) -> EditRecord:
        return self.queue.get(edit_id)

    def list_edits(
        self,
        status: EditStatus | None,
        limit: int,
        after: str | None,
        kind: EditKind | None = None,
    ) -> list[EditRecord]:
        return self.queue.list(status, limit, after, kind)

    def retract(self, edit_id: str, reason: str) -> EditRecord:
        return self.queue.transition(edit_id, EditStatus.RETRACTED, reason=reason)

    def complete(self, request: CompletionRequest) -> list[CompletionChoice]:
        return collect(request, self.stream(request))

    def stream(self, request: CompletionRequest) -> Generator[CompletionDelta, None, None]:
        routing: Callable[[Sequence[str]], AbstractContextManager[None]] = self.routing
        return stream(
            self.world.model,
            self.world.tokenizer,
            request,
            routing,
            turn=self.lock.after_waiting,
        )

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return render_chat(self.world.tokenizer, messages, self.chat_template)

    def model_name(self) -> str:
        return MODEL_NAME

    def model_info(self) -> dict[str, Any]:
        applied = self.queue.applied_by_backend()
        return {
            "name_or_path": MODEL_NAME,
            "loaded_at": 1_700_000_000.0,
            "applied_edits": sum(applied.values()),
            "applied_by_backend": applied,
            "watermark": 0,
        }

    def status(self) -> dict[str, Any]:
        return {
            "queue_depth": self.queue.depth(),
            "counts": self.queue.counts(),
            "last_checkpoint": None,
            "last_drift": None,
        }

    def is_ready(self) -> bool:
        return self.ready

    def worker_problem(self) -> str | None:
        return None

    def metrics_text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def create_checkpoint(self) -> dict[str, Any]:
        self.checkpoints += 1
        return {"id": f"ckpt-{self.checkpoints}", "created_at": time.time(), "edits": 0}

    def run_drift_check(self) -> dict[str, Any]:
        raise DriftDisabledError("drift validation is disabled")

    def list_feeds(self) -> list[dict[str, Any]]:
        return feed_states(self.store)

    def poll_feeds(self, name: str | None) -> list[dict[str, Any]]:
        poller = FeedPoller(self.store, Config(), retract=self.retract)
        reports = poller.poll_due() if name is None else [poller.poll(name)]
        return [report.to_json_dict() for report in reports]

    def start_nightly(self, trigger: str) -> dict[str, Any]:
        self.nightly_triggers.append(trigger)
        return {"started": True, "run": None}

    def restore_checkpoint(self, checkpoint_id: str) -> dict[str, Any]:
        if checkpoint_id != f"ckpt-{self.checkpoints}":
            raise RecordNotFoundError("checkpoint", checkpoint_id)
        return {"checkpoint_id": checkpoint_id, "from_checkpoint": 0, "replayed": 0}


@pytest.fixture(scope="session")
def world_model(micro_world: Path) -> WorldModel:
    """The micro world's model (eval mode) and tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(str(micro_world))
    model.train(False)
    return WorldModel(model, AutoTokenizer.from_pretrained(str(micro_world)))


@pytest.fixture
def facade(store_path: Path, world_model: WorldModel) -> Iterator[StoreFacade]:
    """A ready facade over a fresh store file."""
    store = Store.open(store_path)
    try:
        yield StoreFacade(store, world_model)
    finally:
        store.close()


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(facade: StoreFacade) -> Iterator[ClientFactory]:
    """``make_client(token=..., max_edits_per_request=...)``: a client on a fresh app."""
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        client = TestClient(create_app(facade, ApiConfig(**settings)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@dataclass
class LiveServer:
    """An app served by uvicorn in a thread, as ``editd serve`` serves it."""

    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def make_server(facade: StoreFacade) -> Iterator[ServerFactory]:
    """``make_server(facade=None, **api_settings)``: a live server on a free port."""
    servers: list[LiveServer] = []

    def make(served: DaemonFacade | None = None, **settings: Any) -> LiveServer:
        api = ApiConfig(**settings)
        app = create_app(facade if served is None else served, api)
        sock = bind_socket("127.0.0.1", 0)
        server = http_server(app, api)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        live = LiveServer(app, server, thread, sock.getsockname()[1])
        servers.append(live)
        wait_until(lambda: server.started, what="the server to start")
        return live

    yield make
    for live in servers:
        live.stop()


def wait_until(condition: Callable[[], object], *, timeout: float = 20.0, what: str = "") -> None:
    """Poll ``condition`` every 10 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """A client on an app without a token and with the default limits."""
    return make_client()


@pytest.fixture
def auth() -> dict[str, str]:
    """The Authorization header for :data:`TOKEN`."""
    return {"Authorization": f"Bearer {TOKEN}"}


def assert_error(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """``response`` has ``status`` and the JSON error shape (and names ``field``, if given):
    OpenAI's on the OpenAI-compatible routes (``param`` is the field there), editd's
    elsewhere. Returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    if is_openai_path(response.request.url.path):
        assert set(error) == {"message", "type", "param", "code"}, error
        named = error["param"]
    else:
        assert set(error) == {"message", "field", "type"}
        named = error["field"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert named is None or isinstance(named, str)
    if field is not None:
        assert named == field, error
    return dict(error)
