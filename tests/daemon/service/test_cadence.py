"""A daemon that dies before each checkpoint still checkpoints once replay catches up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from daemon.config import Config, load_config
from daemon.service.daemon import Daemon
from store.checkpoints import list_checkpoints
from store.db import Store
from tests.daemon.service.conftest import write_config


def _wait_applied(daemon: Daemon, ids: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(daemon.get_edit(i).status.value == "applied" for i in ids):
            return
        time.sleep(0.05)
    raise AssertionError("edits not applied")


def _config(tmp_path: Path, micro_world: Path, every_edits: int) -> Config:
    return load_config(
        write_config(
            tmp_path,
            micro_world,
            checkpoints={"every_edits": every_edits, "every_minutes": 600.0},
            scheduler={"enabled": False},
            router={"default_backend": "melo"},
        )
    )


def _lifetime(config: Config, edits: list[dict[str, Any]]) -> Daemon:
    """Start a daemon, apply ``edits``, and die without the shutdown checkpoint."""
    daemon = Daemon(config)
    daemon.start()
    try:
        done = daemon.batches_done
        ids = [r.id for r in daemon.submit([dict(e) for e in edits])]
        _wait_applied(daemon, ids)
        deadline = time.monotonic() + 60
        while daemon.batches_done == done and time.monotonic() < deadline:
            time.sleep(0.05)  # the batch's follow-up (cadence checkpoint) has run
    finally:
        daemon.stop(checkpoint=False)
    return daemon


def test_replayed_edits_count_toward_the_checkpoint_cadence(
    micro_world: Path, world_edits: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Lifetimes that each die before ``every_edits`` new edits still checkpoint."""
    config = _config(tmp_path, micro_world, every_edits=4)
    first = _lifetime(config, world_edits[:3])
    assert first.store is not None
    with Store.open(config.store.path) as store:
        assert list_checkpoints(store) == []
    _lifetime(config, world_edits[3:4])  # replays 3, applies 1: 4 since the last checkpoint
    with Store.open(config.store.path) as store:
        (record,) = list_checkpoints(store)
    assert (record.note, record.edit_count) == ("cadence", 4)


def test_a_long_replay_is_checkpointed_before_serving(
    micro_world: Path, world_edits: list[dict[str, Any]], tmp_path: Path
) -> None:
    _lifetime(_config(tmp_path, micro_world, every_edits=100), world_edits[:3])
    config = _config(tmp_path, micro_world, every_edits=2)
    daemon = Daemon(config)
    daemon.start()
    try:
        assert daemon.restore_report is not None
        assert daemon.restore_report.reconcile.replayed == 3
        assert daemon.store is not None
        (record,) = list_checkpoints(daemon.store)
        assert (record.note, record.edit_count) == ("restore", 3)
    finally:
        daemon.stop(checkpoint=False)
    again = Daemon(config)
    again.start()  # ... so the next start restores it instead of replaying
    try:
        assert again.restore_report is not None
        assert again.restore_report.from_checkpoint == 3
        assert again.restore_report.reconcile.replayed == 0
    finally:
        again.stop(checkpoint=False)
