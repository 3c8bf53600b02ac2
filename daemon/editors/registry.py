"""The back-ends the daemon knows: one :class:`BackendEntry` each, in :data:`BACKENDS`.

A back-end is its package under ``daemon/editors/`` plus one entry here. The centre
reads the table instead of naming back-ends:

- intake accepts a request's ``backend`` when it is ``auto`` or a registered name
  (:func:`daemon.config.request_limits`), and ``[router] backends`` may name any of them;
- dispatch applies back-ends in ``order`` (lowest first), so an edit that fails
  verification on one can be retried on its ``escalates_to`` in the same batch;
- the daemon builds each enabled back-end's editor with its ``factory``;
- metrics label series by ``name``; replay and drift rebuild editors by the name each
  edit was applied by.

``auto`` routing (:mod:`daemon.engine.router`) is a policy over the built-in MELO and
hook back-ends; a registered back-end is chosen by a request that names it or by
``[router] default_backend``.

``make_editor`` also builds the evaluation baselines (``noop``, ``ft``), which are
editors but no back-ends: requests cannot name them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.editors.base import Editor
from daemon.editors.ft import FtConfig, FtEditor
from daemon.editors.hook.config import HookConfig
from daemon.editors.melo.config import MeloConfig
from daemon.editors.noop import NoopEditor
from daemon.model.loading import LoadedModel
from store.schema import Backend


@dataclass(frozen=True)
class EditorContext:
    """What the daemon gives every editor it builds, besides the model and the config.

    ``cache_dir``: a folder for what an editor computes once per model (key statistics,
    locate results); ``calibration_prompts``: prompts edits must leave alone (the drift
    probes), for editors that calibrate on them."""

    cache_dir: Path
    calibration_prompts: tuple[str, ...] = ()


EditorFactory = Callable[[LoadedModel, Any, EditorContext], Editor]
"""Builds a back-end's editor from the model, its ``[editors.<name>]`` section (an
instance of the entry's ``config_class``) and the context."""


@dataclass(frozen=True)
class BackendEntry:
    """One back-end: its name (requests, the store, metric labels), its config section's
    class, how to build its editor, where it stands in a batch (``order``) and where its
    failures go."""

    name: Backend
    config_class: type[Any]
    factory: EditorFactory
    order: int
    escalates_to: Backend | None = None
    summary: str = ""


def _build_melo(loaded: LoadedModel, cfg: MeloConfig, context: EditorContext) -> Editor:
    from daemon.editors.melo.editor import MeloEditor

    return MeloEditor(
        loaded.model,
        loaded.tokenizer,
        cfg,
        calibration_prompts=context.calibration_prompts,
        radius_fraction=cfg.radius_fraction,
        max_target_tokens=cfg.max_target_tokens,
        stop_nll=cfg.stop_nll,
    )


def _build_hook(loaded: LoadedModel, cfg: HookConfig, context: EditorContext) -> Editor:
    from daemon.editors.hook.setup import build_hook_editor

    return build_hook_editor(loaded, cfg, cache_dir=context.cache_dir)


MELO = Backend("melo")
HOOK = Backend("hook")

BACKENDS: dict[Backend, BackendEntry] = {}
"""Every registered back-end by name, in registration order."""


def register(entry: BackendEntry) -> BackendEntry:
    """Add ``entry`` (its name must be new and must not be ``auto``)."""
    if entry.name == Backend.AUTO or entry.name in BACKENDS:
        raise ValueError(f"back-end name '{entry.name}' is taken")
    if entry.escalates_to is not None and entry.escalates_to == entry.name:
        raise ValueError(f"back-end '{entry.name}' cannot escalate to itself")
    BACKENDS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a back-end (tests that register a toy one clean up with this)."""
    BACKENDS.pop(Backend(name), None)


register(BackendEntry(HOOK, HookConfig, _build_hook, 0, escalates_to=MELO, summary="COMEBA-HK"))
register(BackendEntry(MELO, MeloConfig, _build_melo, 1, summary="MELO LoRA blocks"))


def backend_names() -> tuple[Backend, ...]:
    """Registered back-ends, in dispatch order."""
    return tuple(e.name for e in sorted(BACKENDS.values(), key=lambda e: e.order))


def entry(name: str) -> BackendEntry:
    """The entry for ``name``; ``KeyError`` naming the known ones."""
    try:
        return BACKENDS[Backend(name)]
    except (KeyError, ValueError):
        known = ", ".join(backend_names())
        raise KeyError(f"unknown back-end '{name}' (known: {known})") from None


BASELINES = ("noop", "ft")
"""Editors for evaluation only: they measure the harness, not a back-end."""


def editor_names() -> tuple[str, ...]:
    """Everything ``make_editor`` builds: the baselines, then the back-ends."""
    return (*BASELINES, *backend_names())


def make_editor(
    name: str,
    loaded: LoadedModel,
    section: Any = None,
    *,
    cache_dir: Path,
    calibration_prompts: Sequence[str] = (),
) -> Editor:
    """A fresh editor called ``name`` bound to ``loaded``'s model; ``section``: its
    ``[editors.<name>]`` config (None: the defaults); ``cache_dir``: where it keeps what it
    computes once per model (the daemon's is the folder beside the store)."""
    if name == "noop":
        return NoopEditor()
    if name == "ft":
        return FtEditor(loaded.model, loaded.tokenizer, FtConfig())
    try:
        found = entry(name)
    except KeyError:
        raise ValueError(f"unknown editor '{name}' (known: {', '.join(editor_names())})") from None
    context = EditorContext(cache_dir=cache_dir, calibration_prompts=tuple(calibration_prompts))
    return found.factory(loaded, found.config_class() if section is None else section, context)
