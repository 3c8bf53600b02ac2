"""A real ``editd serve`` child process for the daemon benchmarks, with HTTP helpers.

The benchmarks drive the daemon as a client would: a config file under a work folder,
``python -m daemon.cli --config FILE serve --port 0 --port-file FILE`` as a subprocess,
JSON over HTTP on 127.0.0.1. The process runs with one torch thread (``[model] threads``)
and drift validation off (probe runs every few batches would dominate the timings).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.stats import REPO
from daemon.world.editsets import read_jsonl

STARTUP_TIMEOUT_S = 300.0
JSON = {"Content-Type": "application/json"}
"""What every POST declares, also one without a body (the daemon answers 415 otherwise)."""
NEVER = 10**9
SETTLED = frozenset({"applied", "failed", "rejected", "retracted", "superseded"})


def backend_setup(backends: str) -> tuple[list[str], str]:
    """``melo`` | ``hook`` | ``auto`` -> ([router] backends, the requests' ``backend``)."""
    if backends == "melo":
        return ["melo"], "melo"
    if backends == "hook":
        return ["hook", "melo"], "hook"  # MELO takes the hook's escalations
    if backends == "auto":
        return ["hook", "melo"], "auto"
    raise ValueError(f"backends must be melo, hook or auto, got {backends!r}")


def hook_layers(model: Path) -> list[int]:
    """Layers 2-3 (the layout BENCHMARKS.md evaluates on the small world), or the last
    layer of a model with fewer than four (the micro world)."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    n = int(config.get("num_hidden_layers") or config.get("n_layer") or 4)
    return [2, 3] if n >= 4 else [n - 1]


def bench_sections(
    work: Path, model: Path, router_backends: Sequence[str], batch_size: int, **over: Any
) -> dict[str, dict[str, Any]]:
    """The benchmark's config sections: state under ``work``, drift and feeds off."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"name_or_path": str(model), "threads": 1},
        "store": {"path": str(work / "editd.sqlite3")},
        "router": {"backends": list(router_backends)},
        "editors.melo": {"max_blocks": 2048},
        "editors.hook": {"layers": hook_layers(model), "key_position": "prompt_last"},
        "worker": {"batch_size": batch_size, "max_wait_s": 0.1, "poll_interval_s": 0.05},
        "scheduler": {"nightly_enabled": False},
        "checkpoints": {"dir": str(work / "checkpoints"), "every_edits": NEVER},
        "drift": {"enabled": False},
        "feeds": {"enabled": False, "spool_dir": str(work / "spool")},
        "log": {"level": "info", "format": "json"},
    }
    for name, values in over.items():
        sections.setdefault(name.replace("__", "."), {}).update(values)
    return sections


def write_config(work: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``sections`` as ``work/editd.toml``; link the hook's covariance cache."""
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = work / "editd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shared = REPO / "var" / "stats"
    link = Path(sections["store"]["path"]).parent / "stats"
    if shared.is_dir() and not link.exists():
        link.symlink_to(shared)  # the hook's covariance statistics, computed once per model
    return path


def load_edits(path: Path, n: int, backend: str) -> list[dict[str, Any]]:
    """The first ``n`` edits of a JSONL file, each asking for ``backend``."""
    edits = read_jsonl(path)[:n]
    if len(edits) < n:
        raise SystemExit(f"{path} holds only {len(edits)} edits, {n} wanted")
    for e in edits:
        e["backend"] = backend
    return edits


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def histogram(metrics_text: str, name: str) -> dict[str, Any] | None:
    """A Prometheus histogram's count, sum and cumulative buckets (None when absent)."""
    buckets: list[tuple[float, float]] = []
    total = count = None
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            if le and le.group(1) != "+Inf":  # the count says as much (and JSON has no inf)
                buckets.append((float(le.group(1)), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    if count is None:
        return None
    return _histogram_summary(int(count), total or 0.0, buckets)


def _histogram_summary(
    count: int, total: float, buckets: list[tuple[float, float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count, "sum_s": round(total, 3), "buckets": buckets}
    out["mean_s"] = round(total / count, 3) if count else None
    for q in (0.5, 0.95):  # the upper bound of the bucket holding the quantile
        out[f"p{round(q * 100)}_le_s"] = next(
            (le for le, c in buckets if count and c >= q * count), None
        )
    return out


def histogram_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any] | None:
    """What a histogram recorded between two scrapes (``before`` None: since the start)."""
    if after is None or before is None:
        return after
    lows = dict(before["buckets"])
    buckets = [(le, c - lows.get(le, 0.0)) for le, c in after["buckets"]]
    return _histogram_summary(
        after["count"] - before["count"], after["sum_s"] - before["sum_s"], buckets
    )


class DaemonProcess:
    """``editd serve`` as a child process; HTTP helpers against it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.port_file = config.parent / "port"
        self.log_path = config.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.client = httpx.Client(timeout=120)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Start the process and wait until ``/healthz`` answers 200; the seconds taken."""
        t0 = time.perf_counter()
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "daemon.cli", "--config", str(self.config), "serve"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--port", "0", "--port-file", str(self.port_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.wait_ready(timeout)
        return time.perf_counter() - t0

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.tail()}")
            text = self.port_file.read_text().strip() if self.port_file.is_file() else ""
            if text:
                self.port = int(text)
                try:
                    if self.client.get(self.url("/healthz"), timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"serve not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def submit(self, edits: Sequence[dict[str, Any]]) -> list[str]:
        r = self.client.post(self.url("/v1/edits"), json={"edits": list(edits)})
        r.raise_for_status()
        return list(r.json()["ids"])

    def status(self) -> dict[str, Any]:
        r = self.client.get(self.url("/v1/status"))
        r.raise_for_status()
        return dict(r.json())

    def metrics(self) -> str:
        r = self.client.get(self.url("/metrics"))
        r.raise_for_status()
        return r.text

    def complete(self, prompts: Sequence[str], max_tokens: int = 8) -> list[str]:
        body = {"prompt": list(prompts), "max_tokens": max_tokens, "temperature": 0}
        r = self.client.post(self.url("/v1/completions"), json=body)
        r.raise_for_status()
        return [c["text"] for c in r.json()["choices"]]

    def records(self, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Edit records by id (all of them, or those in ``ids``), paging ``GET /v1/edits``."""
        out: dict[str, dict[str, Any]] = {}
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
            r = self.client.get(self.url("/v1/edits"), params=params)
            r.raise_for_status()
            page = r.json()
            out.update({e["id"]: e for e in page["edits"]})
            after = page["next_after"]
            if not after:
                break
        return out if ids is None else {i: out[i] for i in ids if i in out}

    def wait_settled(self, ids: Sequence[str], timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """Wait until none of ``ids`` is queued or applying; their records."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records(ids)
            if len(recs) == len(set(ids)) and all(r["status"] in SETTLED for r in recs.values()):
                return recs
            if time.monotonic() > deadline:
                raise RuntimeError(f"edits not settled after {timeout}s:\n{self.tail()}")
            time.sleep(0.25)

    def wait_idle(self, timeout: float = 600.0) -> dict[str, Any]:
        """Wait until the queue is empty; the status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["queue_depth"] == 0:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue not empty after {timeout}s: {status['edits']}")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)

    def terminate(self, timeout: float = 180.0) -> int:
        """SIGTERM (finish the batch, checkpoint, exit); the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.kill()
        self.client.close()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
