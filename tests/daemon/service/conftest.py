"""A real ``editd serve`` subprocess on a free loopback port, with the micro world."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.config import load_config
from daemon.service.daemon import Daemon
from daemon.world.editsets import counterfactual_edits

STARTUP_TIMEOUT_S = 180.0


def write_config(folder: Path, model: Path, **sections: dict[str, Any]) -> Path:
    """A config file for the micro world under ``folder`` (sections override defaults)."""
    base: dict[str, dict[str, Any]] = {
        "model": {"name_or_path": str(model)},
        "store": {"path": str(folder / "var" / "editd.sqlite3")},
        "checkpoints": {"dir": str(folder / "var" / "checkpoints"), "every_edits": 1000},
        "editors.hook": {"layers": [1], "key_position": "prompt_last", "covariance_tokens": 20000},
        # The micro world's settings for both back-ends: its facts are templates over few
        # subjects, and its drift probes ask the edited subjects' other relations, which
        # subject keys route (see daemon/engine/router.py); the default is covered on SmolLM2.
        "editors.melo": {"max_blocks": 256, "key_position": "prompt_last"},
        "worker": {"batch_size": 4, "max_wait_s": 0.2, "poll_interval_s": 0.05},
        "drift": {"enabled": False},
        "log": {"level": "info", "format": "json"},
    }
    for name, values in sections.items():
        base.setdefault(name.replace("__", "."), {}).update(values)
    return write_toml(folder, base)


def write_toml(folder: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """``folder/editd.toml`` holding these tables (JSON literals are valid TOML values)."""
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "editd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class DaemonProcess:
    """``editd serve`` as a child process; HTTP helpers against it."""

    def __init__(self, config: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port_file = config.parent / "port"
        self.log_path = config.parent / "serve.log"
        self.env = {**os.environ, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, *, wait: bool = True) -> DaemonProcess:
        self.port_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "daemon.cli", "--config", str(self.config), "serve"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0", "--port-file", str(self.port_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.tail()}")
            if self.port_file.is_file() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                try:
                    if httpx.get(self.url("/healthz"), timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"serve not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``method path``; JSON is declared even without a body (POSTs need it)."""
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url(path), timeout=120, headers=headers, **kwargs)

    def submit(self, edits: list[dict[str, Any]]) -> list[str]:
        r = self.request("POST", "/v1/edits", json={"edits": edits})
        assert r.status_code == 202, r.text
        return list(r.json()["ids"])

    def edit(self, edit_id: str) -> dict[str, Any]:
        r = self.request("GET", f"/v1/edits/{edit_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def edit_or_none(self, edit_id: str) -> dict[str, Any] | None:
        r = self.request("GET", f"/v1/edits/{edit_id}")
        return None if r.status_code == 404 else dict(r.json())

    def wait_settled(self, ids: list[str], timeout: float = 300.0) -> dict[str, str]:
        """Wait until no edit of ``ids`` is queued or applying; their statuses."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {i: self.edit(i)["status"] for i in ids}
            if not {"queued", "applying"} & set(states.values()):
                return states
            time.sleep(0.2)
        raise AssertionError(f"edits not settled: {states}\n{self.tail()}")

    def complete(self, prompts: list[str], max_tokens: int = 4) -> list[str]:
        body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 0}
        r = self.request("POST", "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    def terminate(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def world_edits(micro_world: Path) -> list[dict[str, Any]]:
    """200 counterfactual edits on distinct facts of the micro world (both splits)."""
    model = AutoModelForCausalLM.from_pretrained(micro_world)
    tok = AutoTokenizer.from_pretrained(micro_world)
    first = counterfactual_edits(micro_world, model, tok, 100, seed=2)
    second = counterfactual_edits(micro_world, model, tok, 100, seed=2, split="probe")
    for edit in second:
        edit["id"] = "probe-" + edit["id"]
    return first + second


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.close()


def settle(daemon: Daemon, timeout: float = 120) -> None:
    """Wait for a batch to finish and no edit due now to be waiting or in progress."""
    assert daemon.store is not None
    done = daemon.batches_done
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with daemon.store.read() as db:
            (busy,) = db.execute(
                "SELECT COUNT(*) FROM edits WHERE status = 'applying' "
                "OR (status = 'queued' AND schedule = 'now')"
            ).fetchone()
        if busy == 0 and daemon.batches_done > done:
            return
        time.sleep(0.05)
    raise AssertionError("queue did not drain")


@pytest.fixture
def make_daemon(micro_world: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(**sections: dict[str, Any]) -> Daemon:
        folder = tmp_path / f"d{len(started)}"
        sections.setdefault("scheduler", {"enabled": False})
        daemon = Daemon(load_config(write_config(folder, micro_world, **sections)))
        daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for d in started:
        d.stop(checkpoint=False)
