"""Editor names → constructors. The worker and ``editd eval`` build editors here."""

from __future__ import annotations

from daemon.config import Config
from daemon.editors.base import Editor
from daemon.editors.ft import FtConfig, FtEditor
from daemon.editors.noop import NoopEditor
from daemon.errors import NotBuiltYetError
from daemon.model.loading import LoadedModel

EDITOR_NAMES = ("noop", "ft", "hook", "melo")
_NOT_BUILT = {
    "melo": "the MELO back-end",
}


def make_editor(name: str, loaded: LoadedModel, config: Config) -> Editor:
    """A fresh editor called ``name`` bound to ``loaded``'s model."""
    if name == "noop":
        return NoopEditor()
    if name == "ft":
        return FtEditor(loaded.model, loaded.tokenizer, FtConfig())
    if name == "hook":
        from daemon.editors.hook.setup import build_hook_editor

        return build_hook_editor(loaded, config)
    if name in _NOT_BUILT:
        raise NotBuiltYetError(
            f"editor '{name}' is not built yet (it arrives with {_NOT_BUILT[name]})"
        )
    raise ValueError(f"unknown editor '{name}' (known: {', '.join(EDITOR_NAMES)})")
