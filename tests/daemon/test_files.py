"""editd's own files: created private, never written through a planted symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.errors import UnsafePathError
from daemon.files import open_private, write_private_text
from daemon.service.checkpoints import LOCK_FILE, CheckpointManager
from store.db import Store


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file someone else owns, that a planted link points at."""
    path = tmp_path / "victim"
    path.write_text("keep")
    return path


def test_open_private_creates_0600_and_refuses_a_link(tmp_path: Path, victim: Path) -> None:
    os.close(open_private(tmp_path / "own"))
    assert (tmp_path / "own").stat().st_mode & 0o777 == 0o600
    (tmp_path / "planted").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_private(tmp_path / "planted")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError):
        open_private(tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()  # nothing created through the link


def test_write_private_text_refuses_a_link(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "port").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        write_private_text(tmp_path / "port", "8080\n")
    assert victim.read_text() == "keep"
    write_private_text(tmp_path / "own", "8080\n")
    assert (tmp_path / "own").read_text() == "8080\n"
    assert (tmp_path / "own").stat().st_mode & 0o777 == 0o600


def test_the_checkpoint_lock_refuses_a_planted_link(store_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    with Store.open(store_path) as store:
        manager = CheckpointManager(folder, store, keep=1)
        with pytest.raises(UnsafePathError):
            manager.cleanup_temp()
    assert not (tmp_path / "elsewhere").exists()
