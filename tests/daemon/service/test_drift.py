"""Drift validation in a running daemon: an injected damaging edit is detected,
rolled back and isolated, and the other edits end up applied."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from daemon.config import load_config
from daemon.editors.base import Editor, EditOutcome, EditSpec
from daemon.editors.registry import MELO
from daemon.model import arch
from daemon.service.daemon import Daemon
from store.probes import latest_probe_run
from tests.daemon.service.conftest import write_config

NOISE_SCALE = 4.0


class DamagingEditor:
    """A real editor that, for chosen edit ids, also adds noise to an MLP weight
    (what a collapsed closed-form edit does to a model); retracting removes it."""

    def __init__(self, inner: Editor, model: torch.nn.Module, damaging: set[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads_subjects = inner.reads_subjects
        self.model = model
        self.damaging = damaging
        self.noisy: list[str] = []
        weight = arch.projection_weight_out_in(self._module())
        self.shape, self.scale = tuple(weight.shape), float(weight.std()) * NOISE_SCALE

    def _module(self) -> torch.nn.Module:
        return arch.mlp_out_module(self.model, arch.num_layers(self.model) - 1)

    def _noise(self, edit_id: str) -> torch.Tensor:
        seed = int(hashlib.sha256(edit_id.encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.shape, generator=gen) * self.scale

    def _add(self, edit_id: str, sign: float) -> None:
        arch.add_to_projection_weight(self._module(), sign * self._noise(edit_id))

    def apply(self, edits: Sequence[EditSpec]) -> list[EditOutcome]:
        outcomes = self.inner.apply(edits)
        for o in outcomes:
            if o.accepted and o.edit_id in self.damaging:
                self._add(o.edit_id, 1.0)
                self.noisy.append(o.edit_id)
        return outcomes

    def retract(self, edit_ids: Sequence[str]) -> None:
        self.inner.retract(edit_ids)
        for e in edit_ids:
            if e in self.noisy:
                self._add(e, -1.0)
                self.noisy.remove(e)

    def applied_ids(self) -> list[str]:
        return self.inner.applied_ids()

    def routing(self, prompts: Sequence[str]) -> AbstractContextManager[None]:
        return self.inner.routing(prompts)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def save(self, directory: Path) -> None:
        self.inner.save(directory)  # type: ignore[attr-defined]
        (Path(directory) / "noisy.json").write_text(json.dumps(self.noisy))

    def load(self, directory: Path) -> None:
        for e in list(self.noisy):
            self._add(e, -1.0)
        self.inner.load(directory)  # type: ignore[attr-defined]
        self.noisy = json.loads((Path(directory) / "noisy.json").read_text())
        for e in self.noisy:
            self._add(e, 1.0)


def _wait_batches(daemon: Daemon, done_before: int, timeout: float = 300) -> None:
    """Wait until the queue is idle and every claimed batch's follow-up has run."""
    assert daemon.queue is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = daemon.queue.counts()
        busy = counts["queued"] + counts["applying"] + counts["quarantined"]
        if not busy and daemon.batches_done > done_before:
            return
        time.sleep(0.1)
    raise AssertionError("the daemon did not settle")


def test_damaging_edit_is_detected_rolled_back_and_isolated(
    micro_world: Path, world_edits: list[dict[str, Any]], tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        micro_world,
        drift={"enabled": True, "every_batches": 1, "retention_sample": 20},
        checkpoints={"every_edits": 4},
        worker={"batch_size": 4, "max_wait_s": 0.3, "poll_interval_s": 0.05},
        scheduler={"enabled": False},
        router={"default_backend": "melo"},
    )
    daemon = Daemon(load_config(config))
    daemon.start()
    try:
        assert daemon.engine is not None and daemon.store is not None
        inner = daemon.engine.editors[MELO]
        damaging = DamagingEditor(inner, daemon.engine.loaded.model, {"bad"})
        daemon.engine.editors[MELO] = damaging
        first = [dict(e) for e in world_edits[:4]]
        daemon.submit(first)
        _wait_batches(daemon, 0)
        assert {daemon.get_edit(e["id"]).status.value for e in first} == {"applied"}
        good_run = latest_probe_run(daemon.store, "drift")
        assert good_run is not None and good_run.passed
        assert daemon.checkpoints is not None and daemon.checkpoints.latest_valid() is not None

        second = [dict(e) for e in world_edits[4:8]]
        second[2]["id"] = "bad"
        done = daemon.batches_done
        daemon.submit(second)
        _wait_batches(daemon, done)

        states = {e["id"]: daemon.get_edit(e["id"]) for e in first + second}
        assert states["bad"].status.value == "failed"
        assert "drift" in (states["bad"].error or "")
        others = [r.status.value for i, r in states.items() if i != "bad"]
        assert others == ["applied"] * 7, [(i, r.status.value, r.error) for i, r in states.items()][
            4:
        ]
        assert damaging.noisy == []  # the damage is gone from the model
        assert sorted(damaging.applied_ids()) == sorted(i for i in states if i != "bad")
        outs = daemon.engine.greedy([e["prompt"] for e in first + second], 4)
        for e, out in zip(first + second, outs, strict=True):
            if e["id"] != "bad":
                assert out.strip().startswith(e["target"].strip().split()[0]), (e, out)
        assert daemon.run_drift_check() is not None
        last = latest_probe_run(daemon.store, "drift")
        assert last is not None and last.passed
    finally:
        daemon.stop(checkpoint=False)
