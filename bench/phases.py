"""Timing an editor's phases from the outside: functions wrapped with timers while a
benchmark runs, the sizes a benchmark reports (tensor bytes, folder bytes, RSS), and
``bench.cost``'s measurements built on them (a worker-like stream of batches, an
editor's state sizes and save/load times, the machine and code measured).

Nothing in ``daemon/`` is changed: :meth:`PhaseTimer.patched` replaces module
attributes (``"module:function"``) or class attributes (``"module:Class.method"``)
with timing wrappers for the duration of a ``with`` block and puts the originals
back afterwards. A target that no longer exists (the editors change) is skipped and
listed in ``missing``; its time then falls into the enclosing phase.

Times are exclusive: a phase's seconds do not include the phases called inside it
(the hook's solve loop re-reads keys; those forwards count as ``keys``, the rest of
the loop as ``solve``). So the phases of one timed block sum to its wall time.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from daemon.editors.base import Editor, EditSpec
from daemon.engine.engine import Engine

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Probe:
    """Time calls of ``target`` (``"pkg.module:name"`` or ``"pkg.module:Class.name"``)."""

    phase: str
    target: str


# Where each back-end's phases live (the names the editors call at run time).
HOOK_PROBES = (
    Probe("keys", "daemon.editors.hook.editor:encode_sites"),
    Probe("keys", "daemon.editors.hook.solve:capture"),  # the solve loop's key/residual reads
    Probe("targets", "daemon.editors.hook.editor:optimise_targets"),
    Probe("solve", "daemon.editors.hook.editor:solve_layers"),  # spread, sums, guard
    Probe("solve_linalg", "daemon.editors.hook.math:solve_from_sums"),  # float64 Cholesky
    Probe("solve_linalg", "daemon.editors.hook.math:solve_factors"),  # the same, as factors
    Probe("gate", "daemon.editors.hook.layer:HookedProjection.add_keys"),  # key references
    Probe("gate", "daemon.editors.hook.editor:HookEditor._sync_scope"),  # subject index
    Probe("recall_check", "daemon.editors.hook.editor:check_recall"),
    Probe("rollback_copy", "daemon.editors.hook.editor:HookEditor._snapshot"),
)
MELO_PROBES = (
    Probe("checks", "daemon.editors.melo.editor:MeloEditor._check"),
    Probe("radius", "daemon.editors.melo.editor:MeloEditor._new_index"),  # once, lazily
    Probe("keys", "daemon.editors.melo.editor:MeloEditor._keys_by_edit"),
    Probe("training", "daemon.editors.melo.layer:init_block"),
    Probe("training", "daemon.editors.melo.editor:train_block"),
    Probe("index_insert", "daemon.editors.melo.verify:insert_keys"),
    Probe("index_reroute", "daemon.editors.melo.editor:MeloEditor._rerouted"),
    Probe("index_journal", "daemon.editors.melo.index:NeuronIndex.begin"),  # undo journal
    Probe("index_journal", "daemon.editors.melo.index:NeuronIndex.commit"),
    Probe("index_journal", "daemon.editors.melo.index:NeuronIndex.rollback"),
    Probe("editor_verify", "daemon.editors.melo.editor:MeloEditor._verify"),
)
FT_PROBES = (Probe("training", "daemon.editors.ft:FtEditor._train"),)
PROBES: Mapping[str, Sequence[Probe]] = {"hook": HOOK_PROBES, "melo": MELO_PROBES, "ft": FT_PROBES}


@dataclass
class _Frame:
    phase: str
    inner: float = 0.0  # seconds spent in phases called from this one


@dataclass
class PhaseTimer:
    """Exclusive seconds and call counts per phase (one thread)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _stack: list[_Frame] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (minus the phases timed inside it)."""
        frame = _Frame(name)
        self._stack.append(frame)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - frame.inner
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1].inner += elapsed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]  # as functools.wraps sets it
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    @contextmanager
    def patched(self, probes: Sequence[Probe]) -> Iterator[list[str]]:
        """Wrap every probe's target for the block; yields the targets not found."""
        undo: list[tuple[Any, str, Any]] = []
        missing: list[str] = []
        try:
            for probe in probes:
                found = _resolve(probe.target)
                if found is None:
                    missing.append(probe.target)
                    continue
                owner, attr = found
                raw = vars(owner)[attr] if isinstance(owner, type) else getattr(owner, attr)
                undo.append((owner, attr, raw))
                setattr(owner, attr, self._wrapped(probe.phase, raw))
            yield missing
        finally:
            for owner, attr, raw in reversed(undo):
                setattr(owner, attr, raw)

    def _wrapped(self, phase: str, raw: Any) -> Any:
        if isinstance(raw, staticmethod):
            return staticmethod(self.wrap(phase, raw.__func__))
        if isinstance(raw, classmethod):
            return classmethod(self.wrap(phase, raw.__func__))
        return self.wrap(phase, raw)


def _resolve(target: str) -> tuple[Any, str] | None:
    """The object holding ``target``'s attribute and the attribute's name (None: gone)."""
    module_name, _, path = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    if isinstance(owner, type):
        holder = next((c for c in owner.__mro__ if attr in vars(c)), None)
        return None if holder is None else (holder, attr)
    return (owner, attr) if callable(getattr(owner, attr, None)) else None


# --- sizes -------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def settled_rss_bytes() -> int:
    """RSS after a garbage collection (less noise from garbage waiting to be freed)."""
    gc.collect()
    return rss_bytes()


def trimmed_rss_bytes() -> int:
    """RSS after glibc's ``malloc_trim(0)`` hands freed heap pages back (RSS without
    the allocator's free lists: what is really live); plain RSS without glibc."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor and numpy array inside ``value`` (dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def slope_per_1000(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``ys`` against ``xs``, times 1000 (None: under two points)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return 1000.0 * num / den


# --- the cost benchmark's measurements ----------------------------------------------------


def stream(
    editor: Editor, engine: Engine, specs: Sequence[EditSpec], batch: int, timer: PhaseTimer
) -> dict[str, Any]:
    """Apply ``specs`` in batches, verifying as the worker does; counts and wall seconds.

    A failed edit is retracted as the worker does, except on ``ft`` (no daemon back-end:
    its retract re-trains every batch, so it is kept, as the eval harness keeps it)."""
    counts = {"accepted": 0, "refused": 0, "verify_failed": 0}
    t0 = time.perf_counter()
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        with timer.phase("apply_other"):
            outcomes = editor.apply(chunk)
        taken = [s for s, o in zip(chunk, outcomes, strict=True) if o.accepted]
        counts["refused"] += len(chunk) - len(taken)
        with timer.phase("verify"):
            checked = engine.verify(taken) if taken else {}
        bad = [e for e, v in checked.items() if not v.passed]
        if bad and editor.name != "ft":
            with timer.phase("retract"):
                editor.retract(bad)
        counts["verify_failed"] += len(bad)
        counts["accepted"] += len(taken) - len(bad)
    return {**counts, "wall_s": time.perf_counter() - t0}


def per_edit(seconds: dict[str, float], n: int) -> dict[str, float]:
    return {k: round(v / n, 5) for k, v in sorted(seconds.items())}


def measure_state(editor: Editor, folder: Path) -> dict[str, Any]:
    """Tensor bytes of ``state_dict``; ``save``/``load`` seconds and the folder's bytes."""
    t0 = time.perf_counter()
    state = editor.state_dict()
    state_s = time.perf_counter() - t0
    nbytes = tensor_bytes(state)
    del state
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save = getattr(editor, "save", None)
    load = getattr(editor, "load", None)
    t0 = time.perf_counter()
    if save is not None:
        save(folder)
    else:  # ft: no on-disk form of its own
        torch.save(editor.state_dict(), folder / "state.pt")
    save_s = time.perf_counter() - t0
    disk = folder_bytes(folder)
    t0 = time.perf_counter()
    if load is not None:
        load(folder)
    else:
        editor.load_state_dict(torch.load(folder / "state.pt", weights_only=False))
    load_s = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "state_dict_s": round(state_s, 4),
        "state_bytes": nbytes,
        "save_s": round(save_s, 4),
        "disk_bytes": disk,
        "load_s": round(load_s, 4),
    }


def editor_facts(editor: Editor) -> dict[str, Any]:
    stats = getattr(editor, "stats", None) or getattr(editor, "health", None)
    if stats is None:
        return {}
    facts = stats()
    return {k: v for k, v in facts.items() if isinstance(v, int | float | str | None)}


def machine() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        run = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    diff = subprocess.run(
        ["git", "diff", "HEAD", "--", "daemon", "store"], cwd=REPO, capture_output=True, check=False
    )
    digest = hashlib.sha256(diff.stdout)
    for name in sorted(
        git("ls-files", "--others", "--exclude-standard", "daemon", "store").split()
    ):
        digest.update(name.encode() + (REPO / name).read_bytes())
    return {
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty": git("status", "--porcelain", "--", "daemon", "store").splitlines(),
        "uncommitted_sha256": digest.hexdigest()[:16],  # the daemon code measured, if dirty
    }
