"""Checkpoints on disk: round trips, verification, retention and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from structlog.testing import capture_logs

from daemon.errors import CheckpointError, Shutdown, StoreBusyError
from daemon.service.checkpoints import (
    LOCK_FILE,
    MANIFEST,
    CheckpointManager,
    CheckpointManifest,
    Persistable,
)
from store import checkpoints as registry
from store import editlog
from store.checkpoints import CheckpointStatus
from store.db import Store


class TickingClock:
    """A clock that moves one second per reading, so every checkpoint has its own time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class ArrayState:
    """A small Persistable: arrays in a safetensors file, edit ids in a nested JSON file.

    ``fail`` raises after the first file is written; ``pause`` touches that path after
    the first file and sleeps (a process to be killed mid-save); ``grow`` applies an
    edit during save (the caller broke the no-concurrent-edits rule).
    """

    def __init__(
        self,
        ids: list[str] | None = None,
        seed: int = 0,
        *,
        fail: BaseException | None = None,
        pause: Path | None = None,
        grow: bool = False,
    ) -> None:
        self.ids = list(ids or [])
        self.weights = np.arange(12, dtype=np.float32).reshape(3, 4) + seed
        self.fail, self.pause, self.grow = fail, pause, grow
        self.loads = 0

    def save(self, directory: Path) -> None:
        save_file({"w": self.weights}, str(directory / "weights.safetensors"))
        if self.fail is not None:
            raise self.fail
        if self.pause is not None:
            self.pause.touch()
            time.sleep(120)
        if self.grow:
            self.ids.append("sneaked-in")
        (directory / "meta").mkdir()
        (directory / "meta" / "state.json").write_text(json.dumps({"version": 1, "ids": self.ids}))

    def load(self, directory: Path) -> None:
        self.ids = json.loads((directory / "meta" / "state.json").read_text())["ids"]
        self.weights = load_file(str(directory / "weights.safetensors"))["w"]
        self.loads += 1

    def applied_ids(self) -> list[str]:
        return list(self.ids)


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    """A fresh store whose clock ticks one second per reading."""
    with Store.open(store_path, clock=TickingClock()) as st:
        yield st


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def manager(ckdir: Path, store: Store) -> CheckpointManager:
    return CheckpointManager(ckdir, store, keep=3)


def _editors(n: int = 0) -> dict[str, Persistable]:
    return {"melo": ArrayState([f"m{i}" for i in range(n)], seed=n), "hook": ArrayState(["h0"])}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE)


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_restores_every_editor(manager: CheckpointManager) -> None:
    """create then restore into fresh editors gives back each editor's arrays and ids."""
    saved = _editors(3)
    record = manager.create(saved, watermark=7, reason="test", extra={"model": "micro"})
    fresh = {"melo": ArrayState(), "hook": ArrayState(seed=99)}
    manifest = manager.restore(record, fresh)
    for name in saved:
        a, b = saved[name], fresh[name]
        assert isinstance(a, ArrayState) and isinstance(b, ArrayState)
        assert b.ids == a.ids and np.array_equal(b.weights, a.weights)
    assert manifest.edit_ids == {"hook": ["h0"], "melo": ["m0", "m1", "m2"]}
    assert manifest.watermark == 7 and manifest.extra == {"model": "micro", "reason": "test"}
    assert record.edit_count == 4 and record.note == "test"


def test_registry_holds_the_manifest_sha256_and_the_manifest_every_file_sha256(
    manager: CheckpointManager, store: Store
) -> None:
    """The row's sha256 is that of manifest.json, whose files map lists every file's sha256."""
    record = manager.create(_editors(1), watermark=3, reason="test")
    folder = Path(record.path)
    assert folder.parent == manager.directory and folder.name == record.id
    raw = (folder / MANIFEST).read_bytes()
    assert record.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    manifest = CheckpointManifest.from_json(raw)
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted([*manifest.files, MANIFEST]) == on_disk
    for rel, digest in manifest.files.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest
    assert "melo/meta/state.json" in manifest.files
    assert registry.latest_good(store) == record
    kinds = [e.kind for e in editlog.events(store)]
    assert kinds.count(editlog.EventKind.CHECKPOINT_RECORDED) == 1


def test_ids_sort_by_creation_time(manager: CheckpointManager) -> None:
    """Checkpoint ids are ck-<utc stamp>-<hex>; sorting them sorts by creation."""
    ids = [manager.create(_editors(), watermark=i, reason="t").id for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(i.startswith("ck-2023") for i in ids)
    assert [info.record.id for info in manager.list()] == ids[::-1]


def test_a_corrupt_file_is_detected_marked_bad_and_the_previous_one_is_used(
    manager: CheckpointManager, store: Store
) -> None:
    """A flipped byte fails verify; latest_valid marks it bad, warns, and falls back."""
    older = manager.create(_editors(1), watermark=1, reason="t")
    newer = manager.create(_editors(2), watermark=2, reason="t")
    _flip_byte(Path(newer.path) / "melo" / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"melo/weights.safetensors .*corrupt"):
        manager.verify(newer)
    with capture_logs() as logs:
        found = manager.latest_valid()
    assert found is not None and found[0] == older and found[1].watermark == 1
    bad = registry.get_checkpoint(store, newer.id)
    assert bad.status is CheckpointStatus.BAD
    assert bad.note is not None and "corrupt" in bad.note
    warnings = [e for e in logs if e["event"] == "checkpoint_verification_failed"]
    assert [e["checkpoint_id"] for e in warnings] == [newer.id]
    assert warnings[0]["log_level"] == "warning"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_manifest", "manifest.json has sha256"),
        ("remove_manifest", "cannot read manifest.json"),
        ("remove_folder", "folder is missing"),
        ("remove_file", "hook/meta/state.json is missing"),
        ("add_file", "melo/stray.bin is not listed"),
        ("rewrite_manifest", "manifest.json has sha256"),
    ],
)
def test_partial_or_altered_checkpoints_fail_verification(
    manager: CheckpointManager, store: Store, damage: str, message: str
) -> None:
    """Each kind of damage is named; latest_valid then finds nothing and marks it bad."""
    record = manager.create(_editors(1), watermark=1, reason="t")
    folder = Path(record.path)
    manifest_path = folder / MANIFEST
    if damage == "truncate_manifest":
        manifest_path.write_bytes(manifest_path.read_bytes()[:40])
    elif damage == "remove_manifest":
        manifest_path.unlink()
    elif damage == "remove_folder":
        folder.rename(folder.with_name("elsewhere"))
    elif damage == "remove_file":
        (folder / "hook" / "meta" / "state.json").unlink()
    elif damage == "add_file":
        (folder / "melo" / "stray.bin").write_bytes(b"x")
    else:  # a valid manifest, but not the one registered
        data = json.loads(manifest_path.read_text())
        data["extra"]["reason"] = "forged"
        manifest_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message) as excinfo:
        manager.verify(record)
    assert excinfo.value.checkpoint_id == record.id
    assert manager.latest_valid() is None
    assert registry.get_checkpoint(store, record.id).status is CheckpointStatus.BAD


def test_manifest_round_trips_through_json(manager: CheckpointManager) -> None:
    """to_json/from_json give an equal manifest; the JSON carries a format version."""
    manifest = manager.restore(manager.create(_editors(2), watermark=5, reason="t"), _editors())
    again = CheckpointManifest.from_json(manifest.to_json())
    assert again == manifest
    assert json.loads(manifest.to_json())["format_version"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("not json", "not valid JSON"),
        ([1, 2], "JSON object, not list"),
        ({"format_version": 2}, "'format_version': 2 is not supported"),
        ({"format_version": True}, "'format_version'"),
        ({"surprise": 1}, "unknown"),
        ({"watermark": -1}, "'watermark'"),
        ({"watermark": True}, "'watermark'"),
        ({"checkpoint_id": "../../etc"}, "'checkpoint_id'"),
        ({"created_at": "yesterday"}, "'created_at'"),
        ({"edit_ids": {}}, "'edit_ids'"),
        ({"edit_ids": {"a/b": []}}, "unsafe editor name"),
        ({"edit_ids": {"melo": [1]}}, "list of non-empty strings"),
        ({"files": {"../outside": "0" * 64}}, "outside the editors' folders"),
        ({"files": {"other/x": "0" * 64}}, "outside the editors' folders"),
        ({"files": {"melo/x": "abc"}}, "64 lowercase hex"),
        ({"extra": []}, "'extra'"),
    ],
)
def test_a_bad_manifest_raises_a_clear_error(change: Any, message: str) -> None:
    """from_json names the field that is wrong."""
    good = {
        "format_version": 1,
        "checkpoint_id": "ck-20240101T000000000000Z-0123abcd",
        "created_at": 1.5,
        "watermark": 3,
        "edit_ids": {"melo": ["e1"]},
        "files": {"melo/w.bin": "a" * 64},
        "extra": {},
    }
    CheckpointManifest.from_json(json.dumps(good))
    if isinstance(change, dict):
        text = json.dumps({**good, **change})
    else:
        text = change if isinstance(change, str) else json.dumps(change)
    with pytest.raises(CheckpointError, match=message):
        CheckpointManifest.from_json(text)
    missing = {k: v for k, v in good.items() if k != "files"}
    with pytest.raises(CheckpointError, match=r"missing \['files'\]"):
        CheckpointManifest.from_json(json.dumps(missing))


def test_cleanup_temp_removes_partial_temp_folders_only(manager: CheckpointManager) -> None:
    """Leftover .tmp-* entries (a crashed write or delete) go; checkpoints stay."""
    record = manager.create(_editors(1), watermark=1, reason="t")
    partial = manager.directory / ".tmp-ck-20240101T000000000000Z-deadbeef"
    (partial / "melo").mkdir(parents=True)
    (partial / "melo" / "weights.safetensors").write_bytes(b"half")
    (manager.directory / ".tmp-del-ck-20230101T000000000000Z-00000000").mkdir()
    (manager.directory / ".tmp-stray-file").write_text("x")
    removed = manager.cleanup_temp()
    assert sorted(removed) == sorted(
        [partial.name, ".tmp-del-ck-20230101T000000000000Z-00000000", ".tmp-stray-file"]
    )
    assert _names(manager.directory) == [record.id]
    manager.verify(record)


def test_retention_keeps_the_newest_k_good_checkpoints(ckdir: Path, store: Store) -> None:
    """With keep=2, older good ones are marked bad ('pruned') and their folders deleted."""
    manager = CheckpointManager(ckdir, store, keep=2)
    records = [manager.create(_editors(i), watermark=i, reason="t") for i in range(4)]
    assert _names(ckdir) == [r.id for r in records[2:]]
    good = registry.list_checkpoints(store, status="good")
    assert [r.id for r in good] == [records[3].id, records[2].id]
    for old in records[:2]:
        row = registry.get_checkpoint(store, old.id)
        assert row.status is CheckpointStatus.BAD
        assert row.note is not None and row.note.startswith("pruned:")
    infos = {info.record.id: info for info in manager.list()}
    assert [infos[r.id].restorable for r in records] == [False, False, True, True]
    assert [infos[r.id].exists for r in records] == [False, False, True, True]
    with pytest.raises(CheckpointError, match="marked bad"):
        manager.restore(records[0], _editors())


def test_folders_of_bad_checkpoints_are_deleted_at_the_next_create(
    manager: CheckpointManager, store: Store
) -> None:
    """A checkpoint marked bad (e.g. by drift) keeps its row but loses its folder."""
    first = manager.create(_editors(1), watermark=1, reason="t")
    registry.mark_bad(store, first.id, note="drift")
    assert first.id in _names(manager.directory)
    second = manager.create(_editors(2), watermark=2, reason="t")
    assert _names(manager.directory) == [second.id]
    assert registry.get_checkpoint(store, first.id).note == "drift"


def test_restore_refuses_mismatched_editor_sets_before_loading_anything(
    manager: CheckpointManager,
) -> None:
    """An editor missing from, or unknown to, the manifest: an error and no load at all."""
    record = manager.create(_editors(1), watermark=1, reason="t")
    melo, hook, extra = ArrayState(), ArrayState(), ArrayState()
    with pytest.raises(CheckpointError, match=r"missing \['hook'\]"):
        manager.restore(record, {"melo": melo})
    with pytest.raises(CheckpointError, match=r"unexpected \['extra'\]"):
        manager.restore(record, {"melo": melo, "hook": hook, "extra": extra})
    assert melo.loads == hook.loads == extra.loads == 0


def test_restore_refuses_an_unverifiable_checkpoint(manager: CheckpointManager) -> None:
    """A corrupt checkpoint is not loaded into any editor."""
    record = manager.create(_editors(1), watermark=1, reason="t")
    _flip_byte(Path(record.path) / "hook" / "weights.safetensors", offset=-10)
    editors = {"melo": ArrayState(), "hook": ArrayState()}
    with pytest.raises(CheckpointError, match="corrupt"):
        manager.restore(record, editors)
    assert all(isinstance(e, ArrayState) and e.loads == 0 for e in editors.values())


@pytest.mark.parametrize("error", [OSError("disk full"), Shutdown()])
def test_a_save_failing_midway_leaves_no_checkpoint_and_no_row(
    manager: CheckpointManager, store: Store, error: BaseException
) -> None:
    """An editor raising inside save: no folder, no temp, no row, no event."""
    editors: dict[str, Persistable] = {
        "a": ArrayState(["e1"]),
        "b": ArrayState(["e2"], fail=error),
    }
    expected = CheckpointError if isinstance(error, Exception) else Shutdown
    with pytest.raises(expected) as excinfo:
        manager.create(editors, watermark=1, reason="t")
    if isinstance(excinfo.value, CheckpointError):
        assert "editor 'b' failed to save: disk full" in str(excinfo.value)
    assert _names(manager.directory) == []
    assert registry.list_checkpoints(store) == []
    assert editlog.events(store) == []


def test_a_registry_failure_removes_the_renamed_folder(
    manager: CheckpointManager, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the row cannot be written, the complete folder goes too: nothing is left."""

    def busy(*args: Any, **kwargs: Any) -> Any:
        raise StoreBusyError("store is busy")

    monkeypatch.setattr(registry, "record_checkpoint", busy)
    with pytest.raises(StoreBusyError):
        manager.create(_editors(1), watermark=1, reason="t")
    assert _names(manager.directory) == []
    assert registry.list_checkpoints(store) == []


def test_edits_applied_during_save_fail_the_checkpoint(manager: CheckpointManager) -> None:
    """An editor whose applied ids change while it saves does not make a checkpoint."""
    with pytest.raises(CheckpointError, match="changed its applied edits"):
        manager.create({"melo": ArrayState(["e1"], grow=True)}, watermark=1, reason="t")
    assert _names(manager.directory) == []


def test_bad_arguments_are_refused(ckdir: Path, store: Store) -> None:
    """keep < 1, a negative watermark, unsafe or no editor names, non-JSON extra."""
    with pytest.raises(CheckpointError, match="keep"):
        CheckpointManager(ckdir, store, keep=0)
    manager = CheckpointManager(ckdir, store, keep=1)
    with pytest.raises(CheckpointError, match="watermark"):
        manager.create(_editors(), watermark=-1, reason="t")
    for editors in ({}, {"../up": ArrayState()}, {"manifest.json/": ArrayState()}):
        with pytest.raises(CheckpointError, match="safe names"):
            manager.create(editors, watermark=1, reason="t")
    with pytest.raises(CheckpointError, match="plain JSON"):
        manager.create(_editors(), watermark=1, reason="t", extra={"x": object()})
    assert _names(ckdir) == []


def test_recover_removes_an_orphan_folder_without_a_row(
    manager: CheckpointManager, store: Store
) -> None:
    """A complete folder whose row was never written is removed at start-up."""
    kept = manager.create(_editors(1), watermark=1, reason="t")
    orphan = manager.directory / "ck-20991231T235959000000Z-0badc0de"
    orphan.mkdir()
    (orphan / MANIFEST).write_text("{}")
    report = manager.recover()
    assert report.orphans_removed == (orphan.name,) and report.pruned == ()
    assert _names(manager.directory) == [kept.id]


_CHILD = """
import os, signal, sys
from pathlib import Path
from daemon.service.checkpoints import CheckpointManager
from store import checkpoints as registry
from store.db import Store
from tests.daemon.service.test_checkpoints import ArrayState

store_path, directory, phase, ready = sys.argv[1:5]
manager = CheckpointManager(Path(directory), Store.open(store_path), keep=3)
if phase == "record":  # die between the rename and the registry row
    def crash(*args, **kwargs):
        Path(ready).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    registry.record_checkpoint = crash
    editor = ArrayState(["e2"])
else:  # pause in the middle of save, to be killed by the parent
    editor = ArrayState(["e2"], pause=Path(ready))
manager.create({"melo": editor}, watermark=2, reason="child")
"""


@pytest.mark.parametrize("phase", ["save", "record"])
def test_a_process_killed_mid_create_leaves_only_complete_checkpoints(
    manager: CheckpointManager,
    store: Store,
    store_path: Path,
    tmp_path: Path,
    repo_root: Path,
    phase: str,
) -> None:
    """SIGKILL during save (temp folder) or before the row (orphan): recover cleans up."""
    complete = manager.create({"melo": ArrayState(["e1"])}, watermark=1, reason="t")
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    args = [sys.executable, "-c", _CHILD, str(store_path), str(manager.directory), phase]
    child = subprocess.Popen([*args, str(ready)], cwd=repo_root, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the child never reached the {phase} step"
        if phase == "save":
            os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    leftovers = [n for n in _names(manager.directory) if n != complete.id]
    assert len(leftovers) == 1  # the killed create's temp folder or orphan
    report = manager.recover()
    assert (report.temp_removed if phase == "save" else report.orphans_removed) == tuple(leftovers)
    assert _names(manager.directory) == [complete.id]
    assert [r.id for r in registry.list_checkpoints(store)] == [complete.id]
    found = manager.latest_valid()
    assert found is not None and found[0].id == complete.id


def test_a_real_melo_editor_round_trips_through_a_checkpoint(
    micro_world: Path, manager: CheckpointManager
) -> None:
    """MeloEditor fits Persistable: a restored editor routes and holds edits identically."""
    from daemon.editors.base import EditSpec
    from daemon.editors.melo.config import MeloConfig
    from daemon.editors.melo.editor import MeloEditor
    from daemon.model.loading import load_model
    from daemon.world.editsets import counterfactual_edits

    source, target = (load_model(str(micro_world), device="cpu") for _ in range(2))
    records = counterfactual_edits(micro_world, source.model, source.tokenizer, 2)
    editor = MeloEditor(source.model, source.tokenizer, MeloConfig(radius=0.25))
    other = MeloEditor(target.model, target.tokenizer, MeloConfig(radius=0.25))
    try:
        fields = ("prompt", "target", "subject", "relation")
        editor.apply([EditSpec(r["id"], *(r[f] for f in fields)) for r in records])
        assert len(editor.applied_ids()) == 2
        record = manager.create({"melo": editor}, watermark=9, reason="test")
        manifest = manager.restore(record, {"melo": other})
        assert other.applied_ids() == editor.applied_ids() == manifest.edit_ids["melo"]
        assert other.table.snapshot() == editor.table.snapshot()
        prompts = [r["prompt"] for r in records] + ["An unrelated prompt is"]
        assert other.route_blocks(prompts) == editor.route_blocks(prompts)
    finally:
        editor.close()
        other.close()
